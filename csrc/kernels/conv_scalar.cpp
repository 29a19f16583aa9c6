// Scalar binary convolution: 64-bit xor + popcnt, a register tile of 3 output
// pixels x 4 output channels (12 accumulators), each input word reused 4 times.
#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

constexpr int kLanes = 4;
constexpr int kTile = 3;

size_t block_bytes(const ConvGeometry& g, int nclasses) {
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kLanes * 8 + taps * kLanes * 4 + nclasses * kLanes * 4 + 256;
}

template <int P>
inline void tile(const ConvBlock& b, const uint64_t* wr, int64_t steps, const PixInfo* pix, const int32_t* corr,
                 int32_t K) {
  uint64_t acc[P][kLanes] = {};
  const int64_t* so = b.step_off;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t off = so[s];
    const uint64_t* ws = wr + s * kLanes;
    const uint64_t w0 = ws[0], w1 = ws[1], w2 = ws[2], w3 = ws[3];
    for (int p = 0; p < P; ++p) {
      const uint64_t xv = pix[p].x[off];
      acc[p][0] += __builtin_popcountll(xv ^ w0);
      acc[p][1] += __builtin_popcountll(xv ^ w1);
      acc[p][2] += __builtin_popcountll(xv ^ w2);
      acc[p][3] += __builtin_popcountll(xv ^ w3);
    }
  }
  int32_t res[P * kLanes];
  for (int p = 0; p < P; ++p) {
    const int32_t* c = corr + pix[p].cls * kLanes;
    for (int l = 0; l < kLanes; ++l)
      res[p * kLanes + l] = K - 2 * static_cast<int32_t>(acc[p][l]) - (pix[p].cls ? c[l] : 0);
  }
  epilogue_generic(b, pix, P, res, kLanes);
}

// Layout of a prepared block: [steps][lanes] weights, [taps][lanes] tap sums,
// [nclasses][lanes] corrections.
struct Prepared {
  uint64_t* wr;
  int32_t* tapsum;
  int32_t* corr;
  Prepared(const ConvGeometry& g, void* base) {
    wr = static_cast<uint64_t*>(base);
    tapsum = reinterpret_cast<int32_t*>(wr + g.KH * g.KW * g.Wg * kLanes);
    corr = tapsum + g.KH * g.KW * kLanes;
  }
};

void prepare(const ConvBlock& b, void* base) {
  const Prepared pr(*b.g, base);
  repack_block(b, kLanes, pr.wr);
  for (int l = 0; l < kLanes; ++l) pr.corr[l] = 0;
  block_corrections(b, kLanes, pr.wr, pr.tapsum, pr.corr);
}

void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const Prepared pr(g, const_cast<void*>(base));
  const int64_t steps = g.KH * g.KW * g.Wg;
  const int32_t K = static_cast<int32_t>(g.Cg * g.KH * g.KW);
  PixelWalker walker(b);
  PixInfo pix[kTile];
  int64_t q = b.q0;
  for (; q + kTile <= b.q1; q += kTile) {
    for (int p = 0; p < kTile; ++p) walker.next(pix[p]);
    tile<kTile>(b, pr.wr, steps, pix, pr.corr, K);
  }
  for (; q < b.q1; ++q) {
    walker.next(pix[0]);
    tile<1>(b, pr.wr, steps, pix, pr.corr, K);
  }
}

}  // namespace

const std::vector<ConvKernel>& conv_kernels_scalar() {
  static const std::vector<ConvKernel> tiles{{"3x4", kLanes, kTile, &block_bytes, &prepare, &compute, 1, nullptr}};
  return tiles;
}

}  // namespace onebit
