// A depthwise 1x1 float32 conv (one input channel per group, one output channel per input channel): each
// output one product and then its channel's bias,
//
//   out = x * w[c] + b[c]     rounded twice (a multiply, then an add: torch's channels_last kernel), or
//   out = fma(x, w[c], b[c])  rounded once (torch's NCHW kernel on several threads),
//
// with b[c] = +0.0 without a bias (the sum starts from +0.0: a -0.0 product becomes +0.0). Which of the two
// torch makes for a shape is asked of torch (onebit.engine.graph.floats). NCHW or channels_last in, the same
// layout out.
#pragma once
#include <cstdint>

#include "kernels/isa.h"

namespace onebit {

// rows [r0, r1) of x: a row is one channel's HW contiguous values (NCHW: channel = row % C, per-row w and b),
// or one pixel's C contiguous channels (channels_last: w and b per element of the row).
struct ChannelAffine {
  const float* x;
  float* out;
  const float* w;     // [C]
  const float* b;     // [C] or null: +0.0
  int64_t C, HW;      // channels, pixels per image
  bool channels_last;
  bool fma;
};

using ChannelAffineRows = void (*)(const ChannelAffine& a, int64_t r0, int64_t r1);

void channel_affine_rows_portable(const ChannelAffine& a, int64_t r0, int64_t r1);
#if ONEBIT_X86
void channel_affine_rows_avx2(const ChannelAffine& a, int64_t r0, int64_t r1);
#endif

// All N * C rows (NCHW) or N * HW rows (channels_last) of a, on up to `threads` threads.
void channel_affine(const ChannelAffine& a, int64_t N, int threads);

}  // namespace onebit
