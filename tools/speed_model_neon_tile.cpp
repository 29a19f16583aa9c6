// Stand-alone NEON binary-conv inner loops for tools/speed_model.py: NOT the shipped kernel.
// They model what a 4-pixel x 8-channel register tile of onebit's binary conv costs on an
// AArch64 core, on onebit's layout (weights [step][channel] 64-bit words, a pixel's input
// words contiguous per tap), and are compiled only by the speed model, never built into onebit.
//
// Per step and pixel: acc[p][j] += vcntq_u8(x[p] ^ w[j]), popcount(x xor w) per byte, so
// sum over bytes = number of differing bits = (K - dot) / 2 of the +-1 dot product. Byte
// counters hold up to 31 steps (31 * 8 < 256) before a caller widens them.
//
//   tile_4x8_dup:  one step = one 64-bit word per pixel, broadcast to both halves (ld1r);
//                  4 weight vectors of 2 channels. 16 eor + 16 cnt + 16 add per 2048 MACs.
//   tile_2x16_dup: 2 pixels x 8 weight vectors: 2 broadcasts per 2048 MACs instead of 4.
// (The word-pair loop, two steps of a pixel in one ldr q, ships: csrc/kernels/conv_pairs_neon.cpp.)
#include <arm_neon.h>

#include <cstdint>

extern "C" {

// xs[p]: pixel p's input, step_off[s]: word offset of step s, ws: [steps][8] words.
void tile_4x8_dup(const uint64_t* const* xs, const int64_t* step_off, const uint64_t* ws, int64_t steps,
                  uint8x16_t* acc_out) {
  uint8x16_t acc[4][4];
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 4; ++j) acc[p][j] = vdupq_n_u8(0);
  const uint64_t *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t off = step_off[s];
    uint8x16_t w[4];
    for (int j = 0; j < 4; ++j) w[j] = vreinterpretq_u8_u64(vld1q_u64(ws + 8 * s + 2 * j));
    const uint8x16_t x[4] = {
        vreinterpretq_u8_u64(vld1q_dup_u64(x0 + off)), vreinterpretq_u8_u64(vld1q_dup_u64(x1 + off)),
        vreinterpretq_u8_u64(vld1q_dup_u64(x2 + off)), vreinterpretq_u8_u64(vld1q_dup_u64(x3 + off))};
    for (int p = 0; p < 4; ++p)
      for (int j = 0; j < 4; ++j) acc[p][j] = vaddq_u8(acc[p][j], vcntq_u8(veorq_u8(x[p], w[j])));
  }
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 4; ++j) acc_out[4 * p + j] = acc[p][j];
}

// As tile_4x8_dup, 2 pixels x 16 channels: ws is [steps][16] words.
void tile_2x16_dup(const uint64_t* const* xs, const int64_t* step_off, const uint64_t* ws, int64_t steps,
                   uint8x16_t* acc_out) {
  uint8x16_t acc[2][8];
  for (int p = 0; p < 2; ++p)
    for (int j = 0; j < 8; ++j) acc[p][j] = vdupq_n_u8(0);
  const uint64_t *x0 = xs[0], *x1 = xs[1];
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t off = step_off[s];
    const uint8x16_t x[2] = {vreinterpretq_u8_u64(vld1q_dup_u64(x0 + off)),
                             vreinterpretq_u8_u64(vld1q_dup_u64(x1 + off))};
    for (int j = 0; j < 8; ++j) {
      const uint8x16_t w = vreinterpretq_u8_u64(vld1q_u64(ws + 16 * s + 2 * j));
      for (int p = 0; p < 2; ++p) acc[p][j] = vaddq_u8(acc[p][j], vcntq_u8(veorq_u8(x[p], w)));
    }
  }
  for (int p = 0; p < 2; ++p)
    for (int j = 0; j < 8; ++j) acc_out[8 * p + j] = acc[p][j];
}
}
