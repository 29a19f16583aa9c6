#include <immintrin.h>

#include "kernels/pack.h"

namespace onebit {

// AVX2: compare 8 floats against 0 (ordered, so NaN and -0.0 give +1) and
// gather the 8 comparison bits with movemask; 8 such bytes make a word.
void pack_rows_avx2(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  const int64_t words = words_for(channels);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    uint64_t* dst = out + r * words;
    const int64_t full = channels / 64;
    for (int64_t w = 0; w < full; ++w) {
      const float* src = row + w * 64;
      uint64_t word = 0;
      for (int j = 0; j < 8; ++j) {
        const __m256 v = _mm256_loadu_ps(src + 8 * j);
        const uint64_t m = static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)));
        word |= m << (8 * j);
      }
      dst[w] = word;
    }
    if (full < words) {
      uint64_t word = 0;
      for (int64_t c = full * 64; c < channels; ++c) word |= static_cast<uint64_t>(row[c] < 0.0f) << (c - full * 64);
      dst[full] = word;
    }
  }
}

}  // namespace onebit
