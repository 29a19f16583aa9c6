#include "kernels/pool_bits.h"

#include "kernels/conv.h"

#include <cstddef>
#include <vector>

namespace onebit {

void max_pool_bits(const uint64_t* x, const uint64_t* or_mask, const uint64_t* pad, uint64_t* out,
                   const PoolBitsGeometry& g) {
  const int64_t OHp = g.OH + 2 * g.OPH, OWp = g.OW + 2 * g.OPW, K = g.G * g.Wg;
  std::vector<uint64_t> acc(static_cast<size_t>(K)), flip(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k)  // the used channel bits of the word (Wg = ceil(Cg / 64), checked)
    flip[k] = minus_one_word(g.Cg, k % g.Wg) & ~or_mask[k];
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t y = 0; y < OHp; ++y)
      for (int64_t xo = 0; xo < OWp; ++xo) {
        uint64_t* dst = out + ((n * OHp + y) * OWp + xo) * K;
        const int64_t oy = y - g.OPH, ox = xo - g.OPW;
        if (oy < 0 || oy >= g.OH || ox < 0 || ox >= g.OW) {
          for (int64_t k = 0; k < K; ++k) dst[k] = pad[k];
          continue;
        }
        for (int64_t k = 0; k < K; ++k) acc[k] = 0;
        for (int64_t ky = 0; ky < g.KH; ++ky) {
          const int64_t iy = oy * g.SH - g.PH + ky * g.DH;
          if (iy < 0 || iy >= g.H) continue;
          for (int64_t kx = 0; kx < g.KW; ++kx) {
            const int64_t ix = ox * g.SW - g.PW + kx * g.DW;
            if (ix < 0 || ix >= g.W) continue;
            const uint64_t* src = x + ((n * g.H + iy) * g.W + ix) * K;
            for (int64_t k = 0; k < K; ++k) acc[k] |= src[k] ^ flip[k];
          }
        }
        for (int64_t k = 0; k < K; ++k) dst[k] = acc[k] ^ flip[k];
      }
}

}  // namespace onebit
