// AVX2 max-pool pixels: 8 channels per vector, 4 pixels at a time (4 independent chains of compares), torch's
// rule as a blend of the taps that are greater than the best so far or NaN (less, in a BatchNorm's
// descending channels).
#include <immintrin.h>

#include "kernels/pool_float.h"

namespace onebit {
namespace {

inline __m256 take_max(__m256 best, __m256 v) {
  const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_ps(best, v, take);
}

// The same taking the min where descending (a lane's sign bit, as blendv reads it).
inline __m256 take_max_or_min(__m256 best, __m256 v, __m256 descending) {
  const __m256 better = _mm256_blendv_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ), _mm256_cmp_ps(v, best, _CMP_LT_OQ), descending);
  return _mm256_blendv_ps(best, v, _mm256_or_ps(better, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

// Pixels [p, p + P) of channels [c, c + 8), with the BatchNorm when Epi.
template <int P, bool Epi>
inline void pool8(const float* px, const int64_t* offsets, int taps, int64_t pixel_step, int64_t c, float* po,
                  int64_t out_step, const PoolEpilogue* e) {
  __m256 b[P];
  for (int i = 0; i < P; ++i) b[i] = _mm256_loadu_ps(px + i * pixel_step + offsets[0] + c);
  if (Epi) {
    const __m256 scale = _mm256_loadu_ps(e->scale + c), shift = _mm256_loadu_ps(e->shift + c);
    const bool descending = _mm256_movemask_ps(scale) != 0;
    for (int t = 1; t < taps; ++t)
      for (int i = 0; i < P; ++i) {
        const __m256 v = _mm256_loadu_ps(px + i * pixel_step + offsets[t] + c);
        b[i] = descending ? take_max_or_min(b[i], v, scale) : take_max(b[i], v);
      }
    for (int i = 0; i < P; ++i)
      b[i] = e->fma ? _mm256_fmadd_ps(b[i], scale, shift) : _mm256_add_ps(_mm256_mul_ps(b[i], scale), shift);
  } else {
    for (int t = 1; t < taps; ++t)
      for (int i = 0; i < P; ++i) b[i] = take_max(b[i], _mm256_loadu_ps(px + i * pixel_step + offsets[t] + c));
  }
  for (int i = 0; i < P; ++i) _mm256_storeu_ps(po + i * out_step + c, b[i]);
}

template <bool Epi>
void pool_pixels(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                 int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e) {
  const int64_t vec_end = channels / 8 * 8;
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4)
    for (int64_t c = 0; c < vec_end; c += 8)
      pool8<4, Epi>(x + p * pixel_step, offsets, taps, pixel_step, c, out + p * out_step, out_step, e);
  for (; p < pixels; ++p)
    for (int64_t c = 0; c < vec_end; c += 8)
      pool8<1, Epi>(x + p * pixel_step, offsets, taps, pixel_step, c, out + p * out_step, out_step, e);
  if (vec_end < channels) {
    const PoolEpilogue rest = e ? PoolEpilogue{e->scale + vec_end, e->shift + vec_end, e->fma} : PoolEpilogue{};
    max_pool_pixels_reference(x + vec_end, offsets, taps, pixel_step, pixels, channels - vec_end, out + vec_end,
                              out_step, e ? &rest : nullptr);
  }
}

}  // namespace

void max_pool_pixels_avx2(const float* x, const int64_t* offsets, int taps, int64_t pixel_step, int64_t pixels,
                          int64_t channels, float* out, int64_t out_step, const PoolEpilogue* e) {
  if (e) return pool_pixels<true>(x, offsets, taps, pixel_step, pixels, channels, out, out_step, e);
  pool_pixels<false>(x, offsets, taps, pixel_step, pixels, channels, out, out_step, nullptr);
}

}  // namespace onebit
