// NEON (aarch64) binary convolution: xor + vcntq_u8, byte counts widened pairwise.
//
// A block's weights are [steps][lanes] 64-bit words (one word of one output channel per lane),
// two channels to a 128-bit register. A step of one pixel is its input word broadcast to both
// halves (ld1r), then per weight register: eor, cnt (16 byte counts, 8 per channel), add into a
// byte accumulator. A byte grows by at most 8 a step, so up to 31 steps add up in bytes
// (31 * 8 < 256); then uaddlp + uadalp widen them into 32-bit totals (2 lanes a channel), kept in
// memory so that the byte accumulators have the registers. Register tiles (pixels x channels):
//   8x4: 8 pixels x 2 weight registers (16 byte accumulators), each weight load reused 8 times;
//   4x8: 4 pixels x 4 weight registers; 4x4 and 2x8: smaller tiles for short rows or few channels.
// The epilogue (acc = K - 2 popcount - correction, then conv_epilogue_neon.h) works on 4 channels
// per register. conv_pairs_neon.cpp holds the tiles that load two input words at once.
#include <arm_neon.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"
#include "kernels/conv_epilogue_neon.h"

namespace onebit {
namespace {

constexpr int kPerReg = 2;  // output channels per 128-bit weight register (64-bit lanes)
constexpr int64_t kFlush = 31;  // max steps between byte -> 32-bit widenings (31 * 8 < 256)

template <int MaxJ>
size_t block_bytes(const ConvGeometry& g, int nclasses) {
  constexpr int kBlock = kPerReg * MaxJ;
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kBlock * 8 + taps * kBlock * 4 + static_cast<size_t>(nclasses) * kBlock * 4 + 256;
}

// Layout of a prepared block (lanes = 2 J): [steps][lanes] weights, [taps][lanes] tap sums,
// [nclasses][lanes] corrections.
struct Prepared {
  uint64_t* wr;
  int32_t* tapsum;
  int32_t* corr;
  Prepared(const ConvGeometry& g, int lanes, void* base) {
    wr = static_cast<uint64_t*>(base);
    tapsum = reinterpret_cast<int32_t*>(wr + g.KH * g.KW * g.Wg * lanes);
    corr = tapsum + g.KH * g.KW * lanes;
  }
};

inline int block_j(const ConvBlock& b) { return static_cast<int>((b.nco + kPerReg - 1) / kPerReg); }

// The conv's inner loop: steps [s, end) of P pixels against J weight registers, popcounts of
// x xor w added into byte accumulators acc[p][j] (byte 8 l + i: channel 2 j + l, byte i of the
// 64-bit word). Requires end - s <= 31.
template <int P, int J>
inline void binary_conv_steps_neon(const uint64_t* const* x, const int64_t* step_off, const uint64_t* w, int64_t s,
                                   int64_t end, uint8x16_t (&acc)[P][J]) {
  for (; s < end; ++s) {
    const int64_t off = step_off[s];
    const uint8x16_t* ws = reinterpret_cast<const uint8x16_t*>(w + s * J * kPerReg);
    uint8x16_t wv[J];
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) wv[j] = ws[j];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const uint8x16_t xv = vreinterpretq_u8_u64(vld1q_dup_u64(x[p] + off));
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) acc[p][j] = vaddq_u8(acc[p][j], vcntq_u8(veorq_u8(xv, wv[j])));
    }
  }
}

struct Ctx {
  const ConvBlock* b;
  const uint64_t* wr;
  const int32_t* corr;  // [nclasses][2 J]
  int64_t steps;
  int32_t K;
};

template <int P, int J>
inline void tile(const Ctx& c, const PixInfo* pix) {
  const ConvBlock& b = *c.b;
  const uint64_t* xs[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) xs[p] = pix[p].x;
  alignas(16) uint32_t total[P][J][4] = {};  // 32-bit totals, 2 lanes a channel
  const int64_t passes = (c.steps + kFlush - 1) / kFlush;
  const int64_t chunk = (c.steps + passes - 1) / passes;
  for (int64_t s = 0; s < c.steps; s += chunk) {
    uint8x16_t acc[P][J];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) acc[p][j] = vdupq_n_u8(0);
    binary_conv_steps_neon<P, J>(xs, b.step_off, c.wr, s, s + chunk < c.steps ? s + chunk : c.steps, acc);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        uint32_t* t = total[p][j];
        vst1q_u32(t, vpadalq_u16(vld1q_u32(t), vpaddlq_u8(acc[p][j])));
      }
  }
  const int32x4_t K = vdupq_n_s32(c.K);
  for (int p = 0; p < P; ++p) {
    uint64_t bits = 0;
    for (int j = 0; j < J; j += 2) {
      // channels 2 j .. 2 j + 3: pairwise sums of the 2-lane totals
      const uint32x4_t lo = vld1q_u32(total[p][j]);
      const uint32x4_t hi = j + 1 < J ? vld1q_u32(total[p][j + 1]) : vdupq_n_u32(0);
      const int32x4_t pc = vreinterpretq_s32_u32(vpaddq_u32(lo, hi));
      int32x4_t a = vsubq_s32(K, vaddq_s32(pc, pc));
      if (pix[p].cls) a = vsubq_s32(a, vld1q_s32(c.corr + pix[p].cls * J * kPerReg + j * kPerReg));
      const int64_t valid = b.nco - j * kPerReg;
      epilogue4_neon(b, pix[p], b.co0 + j * kPerReg, valid < 4 ? valid : 4, a, bits, j * kPerReg);
    }
    if (b.o->mode == OutMode::threshold) write_bits(*b.o, pix[p].obits, b.co0, b.nco, bits, b.bits_bytewise);
  }
}

template <int TP, int J>
void run_j(const Ctx& c) {
  const ConvBlock& b = *c.b;
  PixelWalker walker(b);
  PixInfo pix[TP];
  int64_t q = b.q0;
  for (; q + TP <= b.q1; q += TP) {
    for (int p = 0; p < TP; ++p) walker.next(pix[p]);
    tile<TP, J>(c, pix);
  }
  const int64_t left = b.q1 - q;
  for (int p = 0; p < left; ++p) walker.next(pix[p]);
  int p = 0;
  if (TP > 4)
    for (; p + 4 <= left; p += 4) tile<4, J>(c, pix + p);
  if (TP > 2)
    for (; p + 2 <= left; p += 2) tile<2, J>(c, pix + p);
  for (; p < left; ++p) tile<1, J>(c, pix + p);
}

void prepare(const ConvBlock& b, void* base) {
  const int lanes = block_j(b) * kPerReg;
  const Prepared pr(*b.g, lanes, base);
  repack_block(b, lanes, pr.wr);
  for (int l = 0; l < lanes; ++l) pr.corr[l] = 0;
  block_corrections(b, lanes, pr.wr, pr.tapsum, pr.corr);
}

// A tile of TP pixels x MaxJ registers (a block's last, partial register count J <= MaxJ).
template <int TP, int MaxJ>
void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const int J = block_j(b);
  const Prepared pr(g, J * kPerReg, const_cast<void*>(base));
  const Ctx c{&b, pr.wr, pr.corr, g.KH * g.KW * g.Wg, static_cast<int32_t>(g.Cg * g.KH * g.KW)};
  switch (J) {
    case 1: run_j<TP, 1>(c); break;
    case 2: run_j<TP, 2 <= MaxJ ? 2 : 1>(c); break;
    case 3: run_j<TP, 3 <= MaxJ ? 3 : 1>(c); break;
    default: run_j<TP, 4 <= MaxJ ? 4 : 1>(c); break;
  }
}

template <int TP, int MaxJ>
constexpr ConvKernel make_tile(const char* name) {
  return ConvKernel{name, kPerReg * MaxJ, TP, &block_bytes<MaxJ>, &prepare, &compute<TP, MaxJ>, 1, nullptr};
}

}  // namespace

const std::vector<ConvKernel>& conv_kernels_neon() {
  static const std::vector<ConvKernel> tiles = [] {
    std::vector<ConvKernel> all{
        make_tile<8, 2>("8x4"),
        make_tile<4, 4>("4x8"),
        make_tile<4, 2>("4x4"),
        make_tile<2, 4>("2x8"),
    };
    for (const ConvKernel& k : conv_kernels_neon_pairs()) all.push_back(k);
    return all;
  }();
  return tiles;
}

}  // namespace onebit
