// NEON (aarch64) bit-packing: vcltzq_f32 (x < 0, ordered: NaN and -0.0 give +1), masks narrowed to
// bytes, weighted by their bit and summed across the register (vaddv) into 16 bits at a time.
#include <arm_neon.h>

#include "kernels/pack.h"

namespace onebit {
namespace {

// Bits k = 0 .. 15 of (s[k] < 0).
inline uint64_t sign_bits16(const float* s) {
  const uint16x8_t m01 = vcombine_u16(vmovn_u32(vcltzq_f32(vld1q_f32(s))), vmovn_u32(vcltzq_f32(vld1q_f32(s + 4))));
  const uint16x8_t m23 =
      vcombine_u16(vmovn_u32(vcltzq_f32(vld1q_f32(s + 8))), vmovn_u32(vcltzq_f32(vld1q_f32(s + 12))));
  const uint8x16_t weights = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t m = vandq_u8(vcombine_u8(vmovn_u16(m01), vmovn_u16(m23)), weights);
  return vaddv_u8(vget_low_u8(m)) | static_cast<uint64_t>(vaddv_u8(vget_high_u8(m))) << 8;
}

// count <= 64 contiguous floats into one word: 16 at a time, the rest one by one.
inline uint64_t sign_word(const float* s, int64_t count) {
  uint64_t word = 0;
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) word |= sign_bits16(s + j) << j;
  for (; j < count; ++j) word |= static_cast<uint64_t>(s[j] < 0.0f) << j;
  return word;
}

}  // namespace

void pack_rows_neon(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  const int64_t words = words_for(channels);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    uint64_t* dst = out + r * words;
    for (int64_t w = 0; w < words; ++w) dst[w] = sign_word(row + 64 * w, channels - 64 * w < 64 ? channels - 64 * w : 64);
  }
}

void pack_row_cl_neon(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg);
  for (int64_t w = 0; w < W; ++w)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = x + w * sW + g * Cg;
      uint64_t* dst = out + (w * G + g) * Wg;
      for (int64_t k = 0; k < Wg; ++k) dst[k] = sign_word(src + 64 * k, Cg - 64 * k < 64 ? Cg - 64 * k : 64);
    }
}

// Pixels contiguous (NCHW): 4 pixels a register; channel c's compare mask (all ones or zero)
// shifted down to bit 0, then up to bit c % 32 of the 4 pixels' partial words.
void pack_row_nchw_neon(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg), px = G * Wg;
  int64_t w0 = 0;
  for (; w0 + 4 <= W; w0 += 4)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Wg; ++k) {
        const int64_t count = Cg - 64 * k < 64 ? Cg - 64 * k : 64;
        const float* src = x + (g * Cg + 64 * k) * sC + w0;
        uint32x4_t half[2] = {vdupq_n_u32(0), vdupq_n_u32(0)};
        for (int64_t c = 0; c < count; ++c) {
          const uint32x4_t bit = vshrq_n_u32(vcltzq_f32(vld1q_f32(src + c * sC)), 31);
          half[c / 32] = vorrq_u32(half[c / 32], vshlq_u32(bit, vdupq_n_s32(static_cast<int32_t>(c % 32))));
        }
        alignas(16) uint32_t lo[4], hi[4];
        vst1q_u32(lo, half[0]);
        vst1q_u32(hi, half[1]);
        uint64_t* dst = out + w0 * px + g * Wg + k;
        for (int i = 0; i < 4; ++i) dst[i * px] = lo[i] | static_cast<uint64_t>(hi[i]) << 32;
      }
  for (; w0 < W; ++w0)  // the last pixels, one at a time
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Wg; ++k) {
        const int64_t count = Cg - 64 * k < 64 ? Cg - 64 * k : 64;
        const float* src = x + (g * Cg + 64 * k) * sC + w0;
        uint64_t word = 0;
        for (int64_t c = 0; c < count; ++c) word |= static_cast<uint64_t>(src[c * sC] < 0.0f) << c;
        out[w0 * px + g * Wg + k] = word;
      }
}

}  // namespace onebit
