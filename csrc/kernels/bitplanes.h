// k-bit activations as +-1 bit planes, and the sum of the plane pairs of a stacked binary conv
// (see src/onebit/engine/bitplanes.py for the arithmetic).
//
// pack_integer_planes: float [N, C, H, W] (element strides) -> packed, padded
// [N, H + 2 ph, W + 2 pw, P * G, Wg]: group i * G + g holds plane i of group g's channels. A
// value's level index q in [0, n], n = 2^bits - 1, is computed with the float operations of
// onebit's quantizers, in the same order (so it equals torch's):
//   unsigned ("dorefa"):       q = round_half_even(clamp(x, 0, 1) * n)           (levels q)
//   symmetric ("dorefa_sym"):  q = floor((clamp(x, -c, c) / c + 1) / 2 * n + 1/2) (levels 2 q - n)
// and plane i is +1 where bit i of q is set (packed bit 0), -1 where it is clear (packed bit 1).
// Padding: -1 in every plane for unsigned levels (their zero), all-clear words (+1, corrected
// to 0 by the conv) for symmetric ones. Returns whether x holds a NaN (its planes are then
// meaningless: the layer's outputs that read it are NaN, see bitplanes.py).
//
// combine_planes: the stacked conv's int32 output [pixels, P_a, G, P_w, Cog] ->
//   float out[pixel, g * Cog + c] = fl(fl(fl(acc / divisor) * scale) + bias),
//   acc = (sum_ij coeff[i * P_w + j] * y[pixel, i, g, j, c] + offset[g * Cog + c]) / exact_divisor
// (an exact integer), the layer's arithmetic in onebit.nn.functional.qconv.
#pragma once
#include <cstdint>

namespace onebit {

bool pack_integer_planes(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC,
                         int64_t sH, int64_t sW, int64_t ph, int64_t pw, int64_t G, bool symmetric, int bits,
                         float clip, uint64_t* out, int threads);

void combine_planes(const int32_t* y, int64_t pixels, int64_t Pa, int64_t G, int64_t Pw, int64_t Cog,
                    const int32_t* coeff, const int32_t* offset, int32_t exact_divisor, float divisor,
                    const float* scale, const float* bias, float* out, int threads);

}  // namespace onebit
