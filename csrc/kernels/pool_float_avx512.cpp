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

// The same taking the min in the descending lanes.
inline __m512 take_max_or_min(__m512 best, __m512 v, __mmask16 descending) {
  const __mmask16 better = (_mm512_cmp_ps_mask(v, best, _CMP_GT_OQ) & ~descending) |
                           (_mm512_cmp_ps_mask(v, best, _CMP_LT_OQ) & descending);
  return _mm512_mask_mov_ps(best, better | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), v);
}

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// Pixels [0, P) of channels [c, c + 16) (the lanes in range), with the BatchNorm when Epi.
template <int P, bool Epi>
inline void pool16(const float* px, const int64_t* offsets, int taps, int64_t pixel_step, int64_t c, int64_t channels,
                   float* po, int64_t out_step, const PoolEpilogue* e) {
  const __mmask16 lanes = first_lanes(channels - c);
  __m512 b[P];
  for (int i = 0; i < P; ++i) b[i] = _mm512_maskz_loadu_ps(lanes, px + i * pixel_step + offsets[0] + c);
  if (Epi) {
    const __m512 scale = _mm512_maskz_loadu_ps(lanes, e->scale + c), shift = _mm512_maskz_loadu_ps(lanes, e->shift + c);
    const __mmask16 descending = _mm512_movepi32_mask(_mm512_castps_si512(scale)) & lanes;
    for (int t = 1; t < taps; ++t)
      for (int i = 0; i < P; ++i) {
        const __m512 v = _mm512_maskz_loadu_ps(lanes, px + i * pixel_step + offsets[t] + c);
        b[i] = descending ? take_max_or_min(b[i], v, descending) : take_max(b[i], v);
      }
    for (int i = 0; i < P; ++i)
      b[i] = e->fma ? _mm512_fmadd_ps(b[i], scale, shift) : _mm512_add_ps(_mm512_mul_ps(b[i], scale), shift);
  } else {
    for (int t = 1; t < taps; ++t)
      for (int i = 0; i < P; ++i) b[i] = take_max(b[i], _mm512_maskz_loadu_ps(lanes, px + i * pixel_step + offsets[t] + c));
  }
  for (int i = 0; i < P; ++i) _mm512_mask_storeu_ps(po + i * out_step + c, lanes, b[i]);
}

template <bool Epi>
void pool_pixels(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                 int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e) {
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4)
    for (int64_t c = 0; c < channels; c += 16)
      pool16<4, Epi>(x + p * pixel_step, offsets, taps, pixel_step, c, channels, out + p * out_step, out_step, e);
  for (; p < pixels; ++p)
    for (int64_t c = 0; c < channels; c += 16)
      pool16<1, Epi>(x + p * pixel_step, offsets, taps, pixel_step, c, channels, out + p * out_step, out_step, e);
}

}  // namespace

void max_pool_pixels_avx512(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                            int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e) {
  if (e) return pool_pixels<true>(x, offsets, taps, pixel_step, pixels, channels, out, out_step, e);
  pool_pixels<false>(x, offsets, taps, pixel_step, pixels, channels, out, out_step, nullptr);
}

}  // namespace onebit
