// The depthwise 1x1 conv's loops (channel_affine.h), written once: each ISA's file includes this and is compiled
// with its own flags, so that the compiler vectorizes them for it (std::fma becomes one fused multiply-add
// instruction where the ISA has one; -ffp-contract=off keeps x * w + b two roundings). Internal linkage: each
// file's copy is its own (one inline function compiled with two ISAs' flags would be one symbol).
#pragma once
#include <cmath>

#include "kernels/channel_affine.h"

namespace onebit {
namespace {

template <bool Fma>
inline float affine(float x, float w, float b) {
  if constexpr (Fma) return std::fma(x, w, b);
  return x * w + b;
}

template <bool Fma>
inline void rows(const ChannelAffine& a, int64_t r0, int64_t r1) {
  if (a.channels_last) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = a.x + r * a.C;
      float* out = a.out + r * a.C;
      if (a.b)
        for (int64_t c = 0; c < a.C; ++c) out[c] = affine<Fma>(x[c], a.w[c], a.b[c]);
      else
        for (int64_t c = 0; c < a.C; ++c) out[c] = affine<Fma>(x[c], a.w[c], 0.0f);
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t c = r % a.C;
    const float w = a.w[c], b = a.b ? a.b[c] : 0.0f;
    const float* x = a.x + r * a.HW;
    float* out = a.out + r * a.HW;
    for (int64_t i = 0; i < a.HW; ++i) out[i] = affine<Fma>(x[i], w, b);
  }
}

inline void channel_affine_rows(const ChannelAffine& a, int64_t r0, int64_t r1) {
  if (a.fma)
    rows<true>(a, r0, r1);
  else
    rows<false>(a, r0, r1);
}

}  // namespace

}  // namespace onebit
