// A 1x1 float32 convolution summed in input-channel order, as torch's reference GEMM sums it (the kernel
// torch's NCHW conv runs for some small maps, e.g. 2 x 2 ones):
//
//   out[n, co, p] = (((b + x[n, 0, p] * w[co, 0]) + x[n, 1, p] * w[co, 1]) + ...) + x[n, C-1, p] * w[co, C-1]
//
// with b = bias[co], or +0.0 without a bias; every product and every sum rounded to float32 (no fused
// multiply-add). Each output is one such chain, so every ISA gives the same bits; vectors run across output
// channels. Whether torch sums a shape this way is asked of torch (onebit.engine.sum_order).
#pragma once
#include <cstdint>

#include "kernels/isa.h"

namespace onebit {

// Output channels [co0, co1) of one image: x [C, HW] (contiguous), wt [C, ld] the weight transposed (column co
// is w[co, :]; ld >= co1 rounded up to kOrderedConvBlock, the padding columns zero), bias [ld] (padded with
// zeros likewise) or null, out [Co, HW].
using OrderedConvChannels = void (*)(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                     const float* bias, float* out, int64_t co0, int64_t co1);

void ordered_conv_channels_reference(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                     const float* bias, float* out, int64_t co0, int64_t co1);
#if ONEBIT_X86
void ordered_conv_channels_avx2(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                const float* bias, float* out, int64_t co0, int64_t co1);
void ordered_conv_channels_avx512(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                  const float* bias, float* out, int64_t co0, int64_t co1);
#endif

// The channel block the weight's transposed rows are padded to (a multiple of every kernel's block).
constexpr int64_t kOrderedConvBlock = 32;

// x [N, C, HW] (contiguous), wt [C, ld] with ld a multiple of kOrderedConvBlock >= Co, bias [ld] or null
// (both padded with zeros past Co), out [N, Co, HW]; on up to `threads` threads.
void ordered_conv1x1(const float* x, int64_t N, int64_t C, int64_t HW, const float* wt, int64_t ld, int64_t Co,
                     const float* bias, float* out, int threads);

}  // namespace onebit

namespace onebit {

// A float32 conv of a few input channels (a network's stem: 3 channels, 7x7, stride 2) summed as torch's direct
// conv sums it: each output one chain of fused multiply-adds over the taps inside the input in (kh, kw, c)
// order, from +0.0, without a bias; padding taps are skipped (adding 0 * w would turn a -0.0 sum into +0.0).
// The kernels read a zero-padded copy of the input.
struct TapConvGeometry {
  int64_t N, C, H, W;      // input
  int64_t sN, sC, sH, sW;  // its element strides (NCHW or channels_last)
  int64_t Co, KH, KW, SH, SW, PH, PW, OH, OW;
};

// Rows [oh0, oh1) of one image: xp [C, Hp, Wp] zero padded (Hp = H + 2 PH, Wp = W + 2 PW), wt [KH, KW, C, ld]
// (the weight with its output channels last, padded with zeros to ld, a multiple of kTapConvBlock), out the
// image's [OH, OW, Co] (channels_last).
using TapConvRows = void (*)(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                             int64_t oh0, int64_t oh1);

constexpr int64_t kTapConvBlock = 64;

void tap_conv_rows_reference(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                             int64_t oh0, int64_t oh1);
#if ONEBIT_X86
void tap_conv_rows_avx2(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                        int64_t oh0, int64_t oh1);
void tap_conv_rows_avx512(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                          int64_t oh0, int64_t oh1);
#endif

// x (strides in g) into out [N, OH, OW, Co] (channels_last memory), on up to `threads` threads.
void tap_ordered_conv(const float* x, const float* wt, int64_t ld, float* out, const TapConvGeometry& g, int threads);

}  // namespace onebit
