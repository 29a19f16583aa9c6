// AVX-512 plane transpose: 16 x 16 tiles transposed in registers; edge tiles use masked loads and stores.
// GCC 12 warns that _mm512_undefined_ps(), the don't-care source of the unmasked shuffles, is used
// uninitialized: it is meant to be.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels/relayout.h"

namespace onebit {
namespace {

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1); }

// r[j] becomes column j of the 16 x 16 tile whose rows were r[0..15].
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {  // pairs of rows interleaved, per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3]
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], lane L: column 4 L + c of rows g .. g + 3
    u[g + 0] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // a 4 x 4 transpose of the lanes of u[c], u[4 + c], u[8 + c], u[12 + c]
    const __m512 a = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44);       // lanes 0, 1 of both
    const __m512 b = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);       // lanes 2, 3 of both
    const __m512 e = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44);  // lanes 0, 1 of the others
    const __m512 f = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(a, e, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(a, e, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(b, f, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(b, f, 0xDD);
  }
}

// One tile of nr <= 16 rows and nc <= 16 columns (masks select the lanes in range).
inline void tile16(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t nr, int64_t nc) {
  __m512 r[16];
  const __mmask16 columns = first_lanes(nc), rows = first_lanes(nr);
  for (int i = 0; i < 16; ++i) r[i] = i < nr ? _mm512_maskz_loadu_ps(columns, src + i * src_ld) : _mm512_setzero_ps();
  transpose16(r);
  for (int j = 0; j < nc; ++j) _mm512_mask_storeu_ps(dst + j * dst_ld, rows, r[j]);
}

inline void full_tile16(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_ld);
  transpose16(r);
  for (int j = 0; j < 16; ++j) _mm512_storeu_ps(dst + j * dst_ld, r[j]);
}

}  // namespace

void transpose_block_avx512(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                            int64_t dst_ld) {
  const float* s = reinterpret_cast<const float*>(src);  // moved, never computed on: the bits stay as they are
  float* d = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < rows; i += 16) {
    const int64_t nr = rows - i < 16 ? rows - i : 16;
    for (int64_t j = 0; j < cols; j += 16) {
      const int64_t nc = cols - j < 16 ? cols - j : 16;
      if (nr == 16 && nc == 16)
        full_tile16(s + i * src_ld + j, src_ld, d + j * dst_ld + i, dst_ld);
      else
        tile16(s + i * src_ld + j, src_ld, d + j * dst_ld + i, dst_ld, nr, nc);
    }
  }
}

}  // namespace onebit
