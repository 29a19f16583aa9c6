// AVX2 max-pool pixels: 8 channels per vector, 4 pixels at a time (4 independent chains of compares), torch's
// rule as a blend of the taps that are greater than the best so far or NaN.
#include <immintrin.h>

#include "kernels/pool_float.h"

namespace onebit {
namespace {

inline __m256 take_max(__m256 best, __m256 v) {
  const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_ps(best, v, take);
}

}  // namespace

void max_pool_pixels_avx2(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                          int64_t channels, float* out, int64_t out_step) {
  const int64_t vec_end = channels / 8 * 8;
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4) {
    const float* px = x + p * pixel_step;
    float* po = out + p * out_step;
    for (int64_t c = 0; c < vec_end; c += 8) {
      __m256 b[4];
      for (int i = 0; i < 4; ++i) b[i] = _mm256_loadu_ps(px + i * pixel_step + offsets[0] + c);
      for (int t = 1; t < taps; ++t)
        for (int i = 0; i < 4; ++i) b[i] = take_max(b[i], _mm256_loadu_ps(px + i * pixel_step + offsets[t] + c));
      for (int i = 0; i < 4; ++i) _mm256_storeu_ps(po + i * out_step + c, b[i]);
    }
  }
  for (; p < pixels; ++p) {
    const float* px = x + p * pixel_step;
    for (int64_t c = 0; c < vec_end; c += 8) {
      __m256 b = _mm256_loadu_ps(px + offsets[0] + c);
      for (int t = 1; t < taps; ++t) b = take_max(b, _mm256_loadu_ps(px + offsets[t] + c));
      _mm256_storeu_ps(out + p * out_step + c, b);
    }
  }
  if (vec_end < channels)
    max_pool_pixels_reference(x + vec_end, offsets, taps, pixel_step, pixels, channels - vec_end, out + vec_end,
                              out_step);
}

}  // namespace onebit
