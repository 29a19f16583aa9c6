// The reference binary convolution: one output at a time, straight from the
// definition. Padded taps are skipped for pad_value 0 (no correction trick) and
// read from the packed padding otherwise. Slow, simple, independent of the
// optimized kernels.
#include <cmath>
#include "kernels/conv.h"

namespace onebit {

void binary_conv2d_reference(const ConvGeometry& g, const ConvOutput& o, const uint64_t* x, const uint64_t* w) {
  const int64_t px = g.G * g.Wg;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oh = 0; oh < g.OH; ++oh)
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        const int64_t q = (n * g.OH + oh) * g.OW + ow;
        for (int64_t co = 0; co < g.Co; ++co) {
          const int64_t grp = co / g.Cog;
          int64_t acc = 0;
          for (int64_t kh = 0; kh < g.KH; ++kh)
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t ih = oh * g.sh + kh * g.dh, iw = ow * g.sw + kw * g.dw;  // padded coordinates
              const bool padded = ih < g.ph || ih >= g.ph + g.H || iw < g.pw || iw >= g.pw + g.W;
              if (padded && g.pad_value == 0) continue;
              const uint64_t* xv = x + ((n * g.Hp + ih) * g.Wp + iw) * px + grp * g.Wg;
              const uint64_t* wv = w + ((co * g.KH + kh) * g.KW + kw) * g.Wg;
              int64_t differ = 0;
              for (int64_t k = 0; k < g.Wg; ++k) differ += __builtin_popcountll(xv[k] ^ wv[k]);
              acc += g.Cg - 2 * differ;
            }
          const int32_t a = static_cast<int32_t>(acc);
          switch (o.mode) {
            case OutMode::int32:
              o.out_i32[q * g.Co + co] = a;
              break;
            case OutMode::float32: {
              float f = static_cast<float>(a);
              if (o.scale) f = f * o.scale[co];
              if (o.bias) f = f + o.bias[co];
              if (o.bn_scale)
                f = o.bn_fma ? std::fma(f, o.bn_scale[co], o.bn_shift[co]) : (f * o.bn_scale[co]) + o.bn_shift[co];
              if (o.residual) f = f + o.residual[q * g.Co + co];
              o.out_f32[q * g.Co + co] = f;
              break;
            }
            case OutMode::threshold: {
              const bool bit = o.dir[co] > 0 ? a < o.thr[co] : a > o.thr[co];
              if (bit) {
                const int64_t og = co / o.OCg, b = co % o.OCg;
                const int64_t pix = (n * (g.OH + 2 * o.oph) + oh + o.oph) * (g.OW + 2 * o.opw) + ow + o.opw;
                o.out_bits[pix * o.OG * o.OWg + og * o.OWg + b / 64] |= uint64_t{1} << (b % 64);
              }
              break;
            }
          }
        }
      }
}

}  // namespace onebit
