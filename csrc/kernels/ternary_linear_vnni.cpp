// AVX-512 VNNI kernel of the ternary x int8 linear layer: vpdpbusd on the unpacked 2-bit codes.
#include <immintrin.h>

#include "kernels/ternary_linear.h"

namespace onebit {
namespace ternary {

void chunk_dot_vnni(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot) {
  const __m512i mask = _mm512_set1_epi8(3);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {  // four rows share every activation load; two chains a row
    const uint8_t* wr = w + r * row_bytes;
    __m512i a[4][2];
    for (int t = 0; t < 4; ++t) a[t][0] = a[t][1] = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* xc = xperm + 256 * c;
      const __m512i x0 = _mm512_loadu_si512(xc);
      const __m512i x1 = _mm512_loadu_si512(xc + 64);
      const __m512i x2 = _mm512_loadu_si512(xc + 128);
      const __m512i x3 = _mm512_loadu_si512(xc + 192);
      for (int t = 0; t < 4; ++t) {
        const __m512i wv = _mm512_loadu_si512(wr + t * row_bytes + 64 * c);
        a[t][0] = _mm512_dpbusd_epi32(a[t][0], _mm512_and_si512(wv, mask), x0);
        a[t][1] = _mm512_dpbusd_epi32(a[t][1], _mm512_and_si512(_mm512_srli_epi16(wv, 2), mask), x1);
        a[t][0] = _mm512_dpbusd_epi32(a[t][0], _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask), x2);
        a[t][1] = _mm512_dpbusd_epi32(a[t][1], _mm512_and_si512(_mm512_srli_epi16(wv, 6), mask), x3);
      }
    }
    for (int t = 0; t < 4; ++t) dot[r + t] = _mm512_reduce_add_epi32(_mm512_add_epi32(a[t][0], a[t][1]));
  }
  for (; r < rows; ++r) {
    const uint8_t* w0 = w + r * row_bytes;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* xc = xperm + 256 * c;
      const __m512i wv = _mm512_loadu_si512(w0 + 64 * c);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(wv, mask), _mm512_loadu_si512(xc));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(wv, 2), mask), _mm512_loadu_si512(xc + 64));
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(_mm512_srli_epi16(wv, 4), mask), _mm512_loadu_si512(xc + 128));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(wv, 6), mask), _mm512_loadu_si512(xc + 192));
    }
    dot[r] = _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));
  }
}

}  // namespace ternary
}  // namespace onebit
