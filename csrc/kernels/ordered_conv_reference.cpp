// The ordered 1x1 conv (ordered_conv.h) in portable code, for the ISAs without a kernel of their own: each
// pixel's sums for a block of 32 channels in an array the compiler vectorizes (SSE2, NEON), channel by channel.
#include <algorithm>

#include "kernels/ordered_conv.h"

namespace onebit {

void ordered_conv_channels_reference(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                     const float* bias, float* out, int64_t co0, int64_t co1) {
  constexpr int64_t L = kOrderedConvBlock;
  for (int64_t c0 = co0; c0 < co1; c0 += L) {
    const int64_t nc = std::min(L, co1 - c0);
    for (int64_t p = 0; p < HW; ++p) {
      float acc[L];
      for (int64_t l = 0; l < L; ++l) acc[l] = bias ? bias[c0 + l] : 0.0f;
      const float* w = wt + c0;
      for (int64_t k = 0; k < C; ++k, w += ld) {
        const float v = x[k * HW + p];
        for (int64_t l = 0; l < L; ++l) acc[l] = acc[l] + w[l] * v;
      }
      for (int64_t l = 0; l < nc; ++l) out[(c0 + l) * HW + p] = acc[l];
    }
  }
}

}  // namespace onebit
