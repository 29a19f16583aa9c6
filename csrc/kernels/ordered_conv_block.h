// The ordered 1x1 conv's loop (ordered_conv.h), for each ISA's file to instantiate with its vectors: a tile of
// P pixels x J vectors of output channels, one multiply and one add per product (no fused multiply-add: the
// build's -ffp-contract=off keeps them two roundings).
//
// Vec: the ISA's vector of floats: `using V`, `static constexpr int kLanes`, load (unaligned), broadcast of one
// float, zero, mul, add, store (unaligned).
#pragma once
#include <algorithm>
#include <cstdint>

namespace onebit {
namespace {

template <class Vec, int J, int P>
inline void ordered_conv_tile(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld, const float* bias,
                              float* out, int64_t c0, int64_t nc, int64_t p0, int np) {
  using V = typename Vec::V;
  constexpr int L = Vec::kLanes;
  V acc[P][J];
  for (int j = 0; j < J; ++j) {
    const V b = bias ? Vec::load(bias + c0 + j * L) : Vec::zero();
    for (int p = 0; p < P; ++p) acc[p][j] = b;
  }
  const float* xp = x + p0;
  const float* w = wt + c0;
  const float zero = 0.0f;
  const float* px[P];  // each pixel's input, or a zero for the pixels past the map (their sums are not stored)
  for (int p = 0; p < P; ++p) px[p] = p < np ? xp + p : &zero;
  if (np == P) {
    for (int64_t k = 0; k < C; ++k, xp += HW, w += ld) {
      V wv[J];
      for (int j = 0; j < J; ++j) wv[j] = Vec::load(w + j * L);
      for (int p = 0; p < P; ++p) {
        const V v = Vec::broadcast(xp + p);
        for (int j = 0; j < J; ++j) acc[p][j] = Vec::add(acc[p][j], Vec::mul(wv[j], v));
      }
    }
  } else {
    for (int64_t k = 0; k < C; ++k, w += ld) {
      V wv[J];
      for (int j = 0; j < J; ++j) wv[j] = Vec::load(w + j * L);
      for (int p = 0; p < P; ++p) {
        const V v = Vec::broadcast(px[p]);
        for (int j = 0; j < J; ++j) acc[p][j] = Vec::add(acc[p][j], Vec::mul(wv[j], v));
        if (p < np) px[p] += HW;
      }
    }
  }
  alignas(64) float lanes[J * L];
  for (int p = 0; p < np; ++p) {
    for (int j = 0; j < J; ++j) Vec::store(lanes + j * L, acc[p][j]);
    for (int64_t l = 0; l < nc; ++l) out[(c0 + l) * HW + p0 + p] = lanes[l];
  }
}

template <class Vec, int J, int P>
inline void ordered_conv_channels(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                  const float* bias, float* out, int64_t co0, int64_t co1) {
  constexpr int64_t block = J * Vec::kLanes;
  for (int64_t c0 = co0; c0 < co1; c0 += block)
    for (int64_t p0 = 0; p0 < HW; p0 += P)
      ordered_conv_tile<Vec, J, P>(x, C, HW, wt, ld, bias, out, c0, std::min<int64_t>(block, co1 - c0), p0,
                                   static_cast<int>(std::min<int64_t>(P, HW - p0)));
}

}  // namespace
}  // namespace onebit
