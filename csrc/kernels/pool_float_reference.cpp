// The portable max-pool pixels: torch's rule, one channel at a time.
#include <cmath>

#include "kernels/pool_float.h"

namespace onebit {

void max_pool_pixels_reference(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                               int64_t channels, float* out, int64_t out_step) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t c = 0; c < channels; ++c) {
      const float* px = x + p * pixel_step + c;
      float best = px[offsets[0]];
      for (int t = 1; t < taps; ++t) {
        const float v = px[offsets[t]];
        if (v > best || std::isnan(v)) best = v;
      }
      out[p * out_step + c] = best;
    }
}

}  // namespace onebit
