// Float32 max pooling into channels_last memory, equal to torch's max_pool2d bit for bit.
//
// torch's rule, per output element: the first tap, in (kh, kw) order, whose value is greater than all
// before it, or a NaN (a later NaN replaces an earlier one). Padding taps are skipped. The rule is
// not separable into rows then columns (-0.0 and +0.0 are equal: which one wins depends on the
// order), so every kernel scans each window's taps in torch's order.
#pragma once
#include <cstdint>

#include "kernels/isa.h"

namespace onebit {

// A BatchNorm (eval mode) before the pool, applied after it: y = x * scale[c] + shift[c], rounded once (fma)
// or twice. torch's max of the y is y of the max of the x where scale[c] > 0, and of the min where
// scale[c] < 0 (the taps less than all before, or NaN), bit for bit where the scales are finite and
// nonzero and the shifts finite: y is then monotone in x, a NaN stays a NaN, infinities stay infinite;
// and where no two x give zeros of two signs (so which of equal taps a window keeps cannot show), which
// the caller checks (onebit.engine.graph.floats.batchnorm_before_pool).
struct PoolEpilogue {
  const float* scale;  // [C]
  const float* shift;  // [C]
  bool fma;
};

// out[p * out_step + c] = torch's max of x[p * pixel_step + offsets[t] + c] over t < taps, for p < pixels and
// c < channels (taps >= 1): a run of output pixels whose windows have the same taps; with e, of the
// BatchNorm's y (e's channels indexed as c).
using MaxPoolPixels = void (*)(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e);

void max_pool_pixels_reference(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e);
#if ONEBIT_X86
void max_pool_pixels_avx2(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                          int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e);
void max_pool_pixels_avx512(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                            int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e);
#endif

// x [N, C, H, W] with element strides (sN, sC, sH, sW); out [N, C, OH, OW] in channels_last memory
// (contiguous [N, OH, OW, C]). Every output window holds at least one input tap.
struct MaxPoolGeometry {
  int64_t N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t sN, sC, sH, sW;
};

// Channels-last inputs (sC == 1) pool in place; others (sW == 1: NCHW) have each input row transposed
// once into a small ring of channels_last rows first. Runs on up to `threads` threads.
// With e: the pool of e's BatchNorm of x (see PoolEpilogue).
void max_pool2d_float(const float* x, float* out, const MaxPoolGeometry& g, int threads,
                      const PoolEpilogue* e = nullptr);

}  // namespace onebit
