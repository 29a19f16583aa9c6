// The NEON conv kernels' epilogue (conv_neon.cpp, conv_pairs_neon.cpp): a pixel's integer results,
// 4 channels a register, into the output mode's values with the reference's IEEE operations
// (vcvtq_f32_s32, vmulq_f32 then vaddq_f32 for scale and bias; vfmaq_f32 only for a BatchNorm rounded
// once; the shortcut added last) or threshold bits. Internal linkage, as conv_common.h.
#pragma once
#include <arm_neon.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

// Channels cj .. cj + valid - 1 of one pixel, one at a time (a block's last, partial register):
// the reference's operations; a threshold output's bit of channel cj + l goes to bit shift + l.
inline void epilogue_lanes(const ConvBlock& b, const PixInfo& px, int64_t cj, int64_t valid, const int32_t* a,
                           uint64_t& bits, int shift) {
  const ConvOutput& o = *b.o;
  const int64_t ld = o.ld;  // pixel stride of the outputs
  for (int64_t l = 0; l < valid; ++l) {
    const int64_t c = cj + l;
    switch (o.mode) {
      case OutMode::int32:
        o.out_i32[px.q * ld + c] = a[l];
        break;
      case OutMode::float32: {
        float f = static_cast<float>(a[l]);
        if (o.scale) f = f * o.scale[c];
        if (o.bias) f = f + o.bias[c];
        if (o.bn_scale) f = batchnorm(f, o.bn_scale[c], o.bn_shift[c], o.bn_fma);
        if (o.residual) f = f + o.residual[px.q * o.residual_ld + c];
        o.out_f32[px.q * ld + c] = f;
        break;
      }
      case OutMode::threshold:
        bits |= static_cast<uint64_t>(threshold_bit(a[l], o.thr[c], o.dir[c])) << (shift + l);
        break;
    }
  }
}

// One pixel's 4 channels cj .. cj + 3 (valid of them) after the popcounts: the output mode's epilogue.
inline void epilogue4_neon(const ConvBlock& b, const PixInfo& px, int64_t cj, int64_t valid, int32x4_t a,
                      uint64_t& bits, int shift) {
  const ConvOutput& o = *b.o;
  const int64_t ld = o.ld;  // pixel stride of the outputs
  if (valid < 4) {  // a partial register: lane by lane, the same operations
    alignas(16) int32_t lanes[4];
    vst1q_s32(lanes, a);
    epilogue_lanes(b, px, cj, valid, lanes, bits, shift);
    return;
  }
  switch (o.mode) {
    case OutMode::int32:
      vst1q_s32(o.out_i32 + px.q * ld + cj, a);
      break;
    case OutMode::float32: {
      float32x4_t f = vcvtq_f32_s32(a);
      if (o.scale) f = vmulq_f32(f, vld1q_f32(o.scale + cj));
      if (o.bias) f = vaddq_f32(f, vld1q_f32(o.bias + cj));
      if (o.bn_scale) {
        const float32x4_t sc = vld1q_f32(o.bn_scale + cj), sh = vld1q_f32(o.bn_shift + cj);
        f = o.bn_fma ? vfmaq_f32(sh, f, sc) : vaddq_f32(vmulq_f32(f, sc), sh);
      }
      if (o.residual) f = vaddq_f32(f, vld1q_f32(o.residual + px.q * o.residual_ld + cj));
      vst1q_f32(o.out_f32 + px.q * ld + cj, f);
      break;
    }
    case OutMode::threshold: {
      const int32x4_t thr = vld1q_s32(o.thr + cj);
      const int32_t d[4] = {o.dir[cj], o.dir[cj + 1], o.dir[cj + 2], o.dir[cj + 3]};
      const uint32x4_t pos = vcgtq_s32(vld1q_s32(d), vdupq_n_s32(0));
      const uint32x4_t neg = vbslq_u32(pos, vcltq_s32(a, thr), vcgtq_s32(a, thr));
      const uint32x4_t weights = {1, 2, 4, 8};
      bits |= static_cast<uint64_t>(vaddvq_u32(vandq_u32(neg, weights))) << shift;
      break;
    }
  }
}

}  // namespace
}  // namespace onebit
