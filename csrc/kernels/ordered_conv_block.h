// The ordered 1x1 conv's loop (ordered_conv.h), for each ISA's file to instantiate with its vectors: a tile of
// P pixels x J vectors of output channels, one multiply and one add per product (no fused multiply-add: the
// build's -ffp-contract=off keeps them two roundings).
//
// Vec: the ISA's vector of floats: `using V`, `static constexpr int kLanes`, load (unaligned), broadcast of one
// float, zero, mul, add, store (unaligned).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/ordered_conv.h"

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

namespace onebit {
namespace {

// The tap-ordered conv (ordered_conv.h) on one ISA: tiles of P output pixels of a row x J vectors of output
// channels, each sum one chain of Vec::fma (fused multiply-add) over the taps in (kh, kw, c) order. A pixel
// whose window reaches into the padding skips those taps, as torch does: adding 0 * w instead would turn a
// -0.0 sum (a product that underflowed) into +0.0 for w > 0. Such pixels take one pass over all channels of a
// kTapConvBlock block, enough independent chains to keep the multiply-adds busy.
template <class Vec>
inline void tap_conv_border_pixel(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                                  int64_t oh, int64_t ow) {
  using V = typename Vec::V;
  constexpr int L = Vec::kLanes;
  constexpr int J = static_cast<int>(kTapConvBlock / L);
  const int64_t Hp = g.H + 2 * g.PH, Wp = g.W + 2 * g.PW;
  for (int64_t c0 = 0; c0 < g.Co; c0 += kTapConvBlock) {
    V acc[J];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) acc[j] = Vec::zero();
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t ih = oh * g.SH + kh;  // padded coordinates
      if (ih < g.PH || ih >= g.PH + g.H) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = ow * g.SW + kw;
        if (iw < g.PW || iw >= g.PW + g.W) continue;
        for (int64_t c = 0; c < g.C; ++c) {
          const V v = Vec::broadcast(xp + (c * Hp + ih) * Wp + iw);
          const float* w = wt + ((kh * g.KW + kw) * g.C + c) * ld + c0;
#pragma GCC unroll 16
          for (int j = 0; j < J; ++j) acc[j] = Vec::fma(Vec::load(w + j * L), v, acc[j]);
        }
      }
    }
    const int64_t nc = std::min<int64_t>(kTapConvBlock, g.Co - c0);
    alignas(64) float lanes[kTapConvBlock];
#pragma GCC unroll 16
    for (int j = 0; j < J; ++j) Vec::store(lanes + j * L, acc[j]);
    float* o = out + (oh * g.OW + ow) * g.Co + c0;
    for (int64_t l = 0; l < nc; ++l) o[l] = lanes[l];
  }
}

template <class Vec, int J, int P>
inline void tap_conv_rows(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                          int64_t oh0, int64_t oh1) {
  using V = typename Vec::V;
  constexpr int L = Vec::kLanes;
  constexpr int64_t block = J * L;
  const int64_t Hp = g.H + 2 * g.PH, Wp = g.W + 2 * g.PW, taps = g.KH * g.KW * g.C;
  // each tap's offset in the padded input from its window's corner, in (kh, kw, c) order
  std::vector<int64_t> offsets(static_cast<size_t>(taps));
  for (int64_t kh = 0, t = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw)
      for (int64_t c = 0; c < g.C; ++c) offsets[t++] = (c * Hp + kh) * Wp + kw;
  const int64_t* off = offsets.data();
  // the columns whose windows stay inside the input: [ow_lo, ow_hi)
  const int64_t ow_lo = std::min(g.OW, (g.PW + g.SW - 1) / g.SW);
  const int64_t ow_hi = std::max(ow_lo, std::min(g.OW, g.W + g.PW - g.KW >= 0 ? (g.W + g.PW - g.KW) / g.SW + 1 : 0));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    const int64_t top = oh * g.SH;  // the window's first padded row
    if (top < g.PH || top + g.KH > g.PH + g.H) {
      for (int64_t ow = 0; ow < g.OW; ++ow) tap_conv_border_pixel<Vec>(xp, wt, ld, out, g, oh, ow);
      continue;
    }
    for (int64_t ow = 0; ow < ow_lo; ++ow) tap_conv_border_pixel<Vec>(xp, wt, ld, out, g, oh, ow);
    for (int64_t ow = ow_hi; ow < g.OW; ++ow) tap_conv_border_pixel<Vec>(xp, wt, ld, out, g, oh, ow);
    for (int64_t ow0 = ow_lo; ow0 < ow_hi; ow0 += P) {
      const int np = static_cast<int>(std::min<int64_t>(P, ow_hi - ow0));
      // each pixel's window corner (pixels past the interior read the last one's, and are not stored)
      const float* corner[P];
      for (int p = 0; p < P; ++p) corner[p] = xp + top * Wp + (ow0 + std::min(p, np - 1)) * g.SW;
      for (int64_t c0 = 0; c0 < g.Co; c0 += block) {
        V acc[P][J];
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
          for (int j = 0; j < J; ++j) acc[p][j] = Vec::zero();
        const float* w = wt + c0;
        for (int64_t t = 0; t < taps; ++t, w += ld) {
          const int64_t o = off[t];
          V wv[J];
#pragma GCC unroll 16
          for (int j = 0; j < J; ++j) wv[j] = Vec::load(w + j * L);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            const V v = Vec::broadcast(corner[p] + o);
#pragma GCC unroll 16
            for (int j = 0; j < J; ++j) acc[p][j] = Vec::fma(wv[j], v, acc[p][j]);
          }
        }
        const int64_t nc = std::min<int64_t>(block, g.Co - c0);
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          if (p >= np) break;
          float* o = out + (oh * g.OW + ow0 + p) * g.Co + c0;
          if (nc == block) {
#pragma GCC unroll 16
            for (int j = 0; j < J; ++j) Vec::store(o + j * L, acc[p][j]);
          } else {
            alignas(64) float lanes[block];
            for (int j = 0; j < J; ++j) Vec::store(lanes + j * L, acc[p][j]);
            for (int64_t l = 0; l < nc; ++l) o[l] = lanes[l];
          }
        }
      }
    }
  }
}

}  // namespace
}  // namespace onebit
