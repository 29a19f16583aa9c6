// The ordered convs (ordered_conv.h) in portable code. The 1x1 conv, for the ISAs without a kernel of their own: each
// pixel's sums for a block of 32 channels in an array the compiler vectorizes (SSE2, NEON), channel by channel.
#include <algorithm>
#include <cmath>

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

// The tap-ordered conv: one std::fma chain per output over the taps inside the input, in (kh, kw, c) order.
void tap_conv_rows_reference(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                             int64_t oh0, int64_t oh1) {
  const int64_t Hp = g.H + 2 * g.PH, Wp = g.W + 2 * g.PW;
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t ow = 0; ow < g.OW; ++ow)
      for (int64_t co = 0; co < g.Co; ++co) {
        float acc = 0.0f;
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw) {
            const int64_t ih = oh * g.SH + kh, iw = ow * g.SW + kw;  // padded coordinates
            if (ih < g.PH || ih >= g.PH + g.H || iw < g.PW || iw >= g.PW + g.W) continue;  // padding: skipped
            for (int64_t c = 0; c < g.C; ++c)
              acc = std::fma(xp[(c * Hp + ih) * Wp + iw], wt[((kh * g.KW + kw) * g.C + c) * ld + co], acc);
          }
        out[(oh * g.OW + ow) * g.Co + co] = acc;
      }
}

}  // namespace onebit
