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

// out[p * out_step + c] = torch's max of x[p * pixel_step + offsets[t] + c] over t < taps, for p < pixels and
// c < channels (taps >= 1): a run of output pixels whose windows have the same taps.
using MaxPoolPixels = void (*)(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step);

void max_pool_pixels_reference(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step);
#if ONEBIT_X86
void max_pool_pixels_avx2(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                          int64_t channels, float* out, int64_t out_step);
void max_pool_pixels_avx512(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                            int64_t channels, float* out, int64_t out_step);
#endif

// x [N, C, H, W] with element strides (sN, sC, sH, sW); out [N, C, OH, OW] in channels_last memory
// (contiguous [N, OH, OW, C]). Every output window holds at least one input tap.
struct MaxPoolGeometry {
  int64_t N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t sN, sC, sH, sW;
};

// Channels-last inputs (sC == 1) pool in place; others (sW == 1: NCHW) have each input row transposed
// once into a small ring of channels_last rows first. Runs on up to `threads` threads.
void max_pool2d_float(const float* x, float* out, const MaxPoolGeometry& g, int threads);

}  // namespace onebit
