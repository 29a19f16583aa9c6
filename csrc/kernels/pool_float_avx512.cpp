// AVX-512 max-pool pixels: 16 channels per vector (the last ones masked), 4 pixels at a time (4 independent
// chains of compares), torch's rule as a masked move of the taps greater than the best so far or NaN.
#include <immintrin.h>

#include "kernels/pool_float.h"

namespace onebit {
namespace {

inline __m512 take_max(__m512 best, __m512 v) {
  const __mmask16 take = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_mask_mov_ps(best, take, v);
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

}  // namespace

void max_pool_pixels_avx512(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                            int64_t channels, float* out, int64_t out_step) {
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4) {
    const float* px = x + p * pixel_step;
    float* po = out + p * out_step;
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 lanes = first_lanes(channels - c);
      __m512 b[4];
      for (int i = 0; i < 4; ++i) b[i] = _mm512_maskz_loadu_ps(lanes, px + i * pixel_step + offsets[0] + c);
      for (int t = 1; t < taps; ++t)
        for (int i = 0; i < 4; ++i)
          b[i] = take_max(b[i], _mm512_maskz_loadu_ps(lanes, px + i * pixel_step + offsets[t] + c));
      for (int i = 0; i < 4; ++i) _mm512_mask_storeu_ps(po + i * out_step + c, lanes, b[i]);
    }
  }
  for (; p < pixels; ++p) {
    const float* px = x + p * pixel_step;
    for (int64_t c = 0; c < channels; c += 16) {
      const __mmask16 lanes = first_lanes(channels - c);
      __m512 b = _mm512_maskz_loadu_ps(lanes, px + offsets[0] + c);
      for (int t = 1; t < taps; ++t) b = take_max(b, _mm512_maskz_loadu_ps(lanes, px + offsets[t] + c));
      _mm512_mask_storeu_ps(out + p * out_step + c, lanes, b);
    }
  }
}

}  // namespace onebit
