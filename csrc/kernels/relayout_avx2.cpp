// AVX2 plane transpose: 8 x 8 tiles transposed in registers; edge tiles use masked loads, and their partial
// columns are stored through a small buffer.
#include <immintrin.h>

#include "kernels/relayout.h"

namespace onebit {
namespace {

// The first n of 8 lanes (the sign bit of each 32-bit lane, as maskload / maskstore read it).
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// r[j] becomes column j of the 8 x 8 tile whose rows were r[0..7].
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 4; ++k) {  // pairs of rows interleaved: [a0 b0 a1 b1 | ...], [a2 b2 a3 b3 | ...]
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int g = 0; g < 8; g += 4) {  // u[g + c]: column c (and c + 4) of rows g .. g + 3, per 128-bit lane
    u[g + 0] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
    u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xEE);
    u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {  // the low lanes hold columns 0..3, the high lanes 4..7
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

// One tile of nr <= 8 rows and nc <= 8 columns; a full one without masks.
template <bool kFull>
inline void tile8(const float* src, int64_t src_ld, float* dst, int64_t dst_ld, int64_t nr, int64_t nc) {
  __m256 r[8];
  if (kFull) {
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_ld);
  } else {
    const __m256i columns = first_lanes(nc);
    for (int i = 0; i < 8; ++i) r[i] = i < nr ? _mm256_maskload_ps(src + i * src_ld, columns) : _mm256_setzero_ps();
  }
  transpose8(r);
  if (kFull || nr == 8) {
    for (int j = 0; j < (kFull ? 8 : nc); ++j) _mm256_storeu_ps(dst + j * dst_ld, r[j]);
  } else {
    // a partial column: through a small buffer (vmaskmovps stores are microcoded on AMD: a plane of 3
    // channels, every tile partial, took 3x as long)
    alignas(32) float column[8];
    for (int j = 0; j < nc; ++j) {
      _mm256_store_ps(column, r[j]);
      for (int i = 0; i < nr; ++i) dst[j * dst_ld + i] = column[i];
    }
  }
}

}  // namespace

void transpose_block_avx2(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                          int64_t dst_ld) {
  const float* s = reinterpret_cast<const float*>(src);  // moved, never computed on: the bits stay as they are
  float* d = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < rows; i += 8) {
    const int64_t nr = rows - i < 8 ? rows - i : 8;
    for (int64_t j = 0; j < cols; j += 8) {
      const int64_t nc = cols - j < 8 ? cols - j : 8;
      if (nr == 8 && nc == 8)
        tile8<true>(s + i * src_ld + j, src_ld, d + j * dst_ld + i, dst_ld, 8, 8);
      else if (nr <= 4)  // a few rows (a 3-channel plane): element by element beats a mostly empty tile
        for (int64_t c = 0; c < nc; ++c)
          for (int64_t r = 0; r < nr; ++r) d[(j + c) * dst_ld + i + r] = s[(i + r) * src_ld + j + c];
      else
        tile8<false>(s + i * src_ld + j, src_ld, d + j * dst_ld + i, dst_ld, nr, nc);
    }
  }
}

}  // namespace onebit
