// NEON (aarch64) binary convolution on word pairs: a pixel's two consecutive 64-bit words of one tap
// are one 128-bit load (ldr q, a load-pipe instruction: no broadcast on the vector pipes).
//
// A block's weights are laid out per pair step as [lanes][2] words: channel l's two words of the
// pair in one 128-bit register. A pair step of one pixel is one load of its 2 input words, then per
// channel: eor, cnt (16 byte counts, all of that channel), add into the byte accumulator of that
// (pixel, channel). A tap with an odd word count ends with a single step: a 64-bit load (upper half
// zero) against the word and a zero. Sums do not depend on the order of the steps: all pair steps
// run first, then the single ones. Bytes grow by at most 8 a step: widened into 32-bit totals every
// 31 steps (uaddlp + uadalp), the totals kept in memory. Register tiles (pixels x channels):
//   4x4x2: 16 byte accumulators, 4 weight registers, one input register at a time;
//   2x8x2: 16 accumulators, 8 weight registers.
// The epilogue is conv_neon.cpp's (the reference's float operations, 4 channels a register).
#include <arm_neon.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"
#include "kernels/conv_epilogue_neon.h"

namespace onebit {
namespace {

constexpr int64_t kFlush = 31;  // max steps between byte -> 32-bit widenings (31 * 8 < 256)

// A prepared block: [npair] pair-step word offsets, [nsingle] single-step offsets, the weights
// [npair][lanes][2] then [nsingle][lanes][2] (second word 0), [taps][lanes] tap sums,
// [nclasses][lanes] corrections.
struct Prepared {
  int64_t npair, nsingle;
  int64_t* offsets;  // pairs, then singles
  uint64_t* w;
  int32_t* tapsum;
  int32_t* corr;
  Prepared(const ConvGeometry& g, int lanes, void* base) {
    const int64_t taps = g.KH * g.KW;
    npair = taps * (g.Wg / 2);
    nsingle = taps * (g.Wg % 2);
    offsets = static_cast<int64_t*>(base);
    w = reinterpret_cast<uint64_t*>(offsets + (npair + nsingle + 1) / 2 * 2);  // 16-byte aligned
    tapsum = reinterpret_cast<int32_t*>(w + (npair + nsingle) * lanes * 2);
    corr = tapsum + taps * lanes;
  }
};

template <int L>
size_t block_bytes(const ConvGeometry& g, int nclasses) {
  const size_t taps = g.KH * g.KW, items = taps * ((g.Wg + 1) / 2);
  return (items + 1) * 8 + items * L * 16 + taps * L * 4 + static_cast<size_t>(nclasses) * L * 4 + 256;
}

template <int L>
void prepare(const ConvBlock& b, void* base) {
  const ConvGeometry& g = *b.g;
  const Prepared pr(g, L, base);
  const int64_t taps = g.KH * g.KW, steps = taps * g.Wg;
  const int n = static_cast<int>(b.nco < L ? b.nco : L);
  int64_t pair = 0, single = pr.npair;
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t k = 0; k < g.Wg; k += 2) {
      const int64_t s = t * g.Wg + k, item = k + 1 < g.Wg ? pair++ : single++;
      pr.offsets[item] = b.step_off[s];
      uint64_t* dst = pr.w + item * L * 2;
      for (int l = 0; l < L; ++l) {
        const uint64_t* src = b.w + (b.co0 + l) * steps + s;
        dst[2 * l] = l < n ? src[0] : 0;
        dst[2 * l + 1] = l < n && k + 1 < g.Wg ? src[1] : 0;
      }
    }
  if (!b.row_class) return;
  for (int64_t t = 0; t < taps; ++t)
    for (int l = 0; l < L; ++l) {
      int32_t pc = 0;
      for (int64_t k = 0; l < n && k < g.Wg; ++k) pc += __builtin_popcountll(b.w[(b.co0 + l) * steps + t * g.Wg + k]);
      pr.tapsum[t * L + l] = static_cast<int32_t>(g.Cg) - 2 * pc;
    }
  class_corrections(b, L, pr.tapsum, pr.corr);
}

// The conv's inner loop on word pairs: items [s, end) of P pixels against L channels, popcounts
// of x xor w added into byte accumulators acc[p][l] (all 16 bytes: channel l). Pair items load
// 2 input words, single items 1 (upper half zero). Requires end - s <= 31.
template <int P, int L, bool Pairs>
inline void binary_conv_pairs_neon(const uint64_t* const* x, const int64_t* offsets, const uint64_t* w, int64_t s,
                                   int64_t end, uint8x16_t (&acc)[P][L]) {
  for (; s < end; ++s) {
    const int64_t off = offsets[s];
    const uint8x16_t* ws = reinterpret_cast<const uint8x16_t*>(w + s * L * 2);
    uint8x16_t wv[L];
#pragma GCC unroll 8
    for (int l = 0; l < L; ++l) wv[l] = ws[l];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const uint8x16_t xv = Pairs ? vreinterpretq_u8_u64(vld1q_u64(x[p] + off))
                                  : vreinterpretq_u8_u64(vcombine_u64(vld1_u64(x[p] + off), vdup_n_u64(0)));
#pragma GCC unroll 8
      for (int l = 0; l < L; ++l) acc[p][l] = vaddq_u8(acc[p][l], vcntq_u8(veorq_u8(xv, wv[l])));
    }
  }
}

// Items [s0, s1) in runs of at most 31, each run's bytes widened into the totals.
template <int P, int L, bool Pairs>
inline void run_items(const uint64_t* const* xs, const Prepared& pr, int64_t s0, int64_t s1, uint32_t (&total)[P][L][4]) {
  for (int64_t s = s0; s < s1; s += kFlush) {
    uint8x16_t acc[P][L];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int l = 0; l < L; ++l) acc[p][l] = vdupq_n_u8(0);
    binary_conv_pairs_neon<P, L, Pairs>(xs, pr.offsets, pr.w, s, s + kFlush < s1 ? s + kFlush : s1, acc);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int l = 0; l < L; ++l) vst1q_u32(total[p][l], vpadalq_u16(vld1q_u32(total[p][l]), vpaddlq_u8(acc[p][l])));
  }
}

template <int P, int L>
inline void tile(const ConvBlock& b, const Prepared& pr, int32_t K, const PixInfo* pix) {
  const uint64_t* xs[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) xs[p] = pix[p].x;
  alignas(16) uint32_t total[P][L][4] = {};
  run_items<P, L, true>(xs, pr, 0, pr.npair, total);
  run_items<P, L, false>(xs, pr, pr.npair, pr.npair + pr.nsingle, total);
  const int32x4_t Kv = vdupq_n_s32(K);
  for (int p = 0; p < P; ++p) {
    uint64_t bits = 0;
    for (int l = 0; l < L; l += 4) {  // channels l .. l + 3: each one's 4 lanes summed
      const uint32x4_t c01 = vpaddq_u32(vld1q_u32(total[p][l]), vld1q_u32(total[p][l + 1]));
      const uint32x4_t c23 = vpaddq_u32(vld1q_u32(total[p][l + 2]), vld1q_u32(total[p][l + 3]));
      const int32x4_t pc = vreinterpretq_s32_u32(vpaddq_u32(c01, c23));
      int32x4_t a = vsubq_s32(Kv, vaddq_s32(pc, pc));
      if (pix[p].cls) a = vsubq_s32(a, vld1q_s32(pr.corr + pix[p].cls * L + l));
      const int64_t valid = b.nco - l;
      if (valid > 0) epilogue4_neon(b, pix[p], b.co0 + l, valid < 4 ? valid : 4, a, bits, l);
    }
    if (b.o->mode == OutMode::threshold) write_bits(*b.o, pix[p].obits, b.co0, b.nco, bits, b.bits_bytewise);
  }
}

template <int TP, int L>
void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const Prepared pr(g, L, const_cast<void*>(base));
  const int32_t K = static_cast<int32_t>(g.Cg * g.KH * g.KW);
  PixelWalker walker(b);
  PixInfo pix[TP];
  int64_t q = b.q0;
  for (; q + TP <= b.q1; q += TP) {
    for (int p = 0; p < TP; ++p) walker.next(pix[p]);
    tile<TP, L>(b, pr, K, pix);
  }
  const int64_t left = b.q1 - q;
  for (int p = 0; p < left; ++p) walker.next(pix[p]);
  int p = 0;
  if (TP > 2)
    for (; p + 2 <= left; p += 2) tile<2, L>(b, pr, K, pix + p);
  for (; p < left; ++p) tile<1, L>(b, pr, K, pix + p);
}

template <int TP, int L>
constexpr ConvKernel make_tile(const char* name) {
  return ConvKernel{name, L, TP, &block_bytes<L>, &prepare<L>, &compute<TP, L>, 1, nullptr};
}

}  // namespace

const std::vector<ConvKernel>& conv_kernels_neon_pairs() {
  static const std::vector<ConvKernel> tiles{
      make_tile<4, 4>("4x4x2"),
      make_tile<2, 8>("2x8x2"),
  };
  return tiles;
}

}  // namespace onebit
