#include <immintrin.h>

#include "kernels/pack.h"

namespace onebit {

// AVX-512: one compare-into-mask per 16 floats; the tail uses a masked load.
void pack_rows_avx512(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  const int64_t words = words_for(channels);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    uint64_t* dst = out + r * words;
    for (int64_t w = 0; w < words; ++w) {
      uint64_t word = 0;
      for (int j = 0; j < 4; ++j) {
        const int64_t begin = w * 64 + 16 * j;
        if (begin >= channels) break;
        const int64_t left = channels - begin;
        const __mmask16 load = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(load, row + begin);
        const __mmask16 neg = _mm512_mask_cmp_ps_mask(load, v, zero, _CMP_LT_OQ);
        word |= static_cast<uint64_t>(neg) << (16 * j);
      }
      dst[w] = word;
    }
  }
}

}  // namespace onebit
