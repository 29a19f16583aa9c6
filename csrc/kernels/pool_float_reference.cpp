// The portable max-pool pixels: torch's rule, one channel at a time.
#include <cmath>

#include "kernels/pool_float.h"

namespace onebit {

void max_pool_pixels_reference(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t c = 0; c < channels; ++c) {
      const float* px = x + p * pixel_step + c;
      const bool descending = e != nullptr && std::signbit(e->scale[c]);
      float best = px[offsets[0]];
      for (int t = 1; t < taps; ++t) {
        const float v = px[offsets[t]];
        if ((descending ? v < best : v > best) || std::isnan(v)) best = v;
      }
      if (e != nullptr) best = e->fma ? std::fma(best, e->scale[c], e->shift[c]) : best * e->scale[c] + e->shift[c];
      out[p * out_step + c] = best;
    }
}

}  // namespace onebit
