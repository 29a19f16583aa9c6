// AVX2 kernel of the ternary x int8 linear layer: vpmaddubsw on the unpacked 2-bit codes.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/rms_norm.h"
#include "kernels/ternary_linear.h"

namespace onebit {
namespace ternary {
namespace {

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// One chunk half (32 packed bytes = 128 weights) of one row: int16 sums of code * x, |.| <= 2048.
inline __m256i half_dot(const uint8_t* wp, const int8_t* xc, int h, __m256i mask) {
  const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i* xs = reinterpret_cast<const __m256i*>(xc + 32 * h);
  __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(wv, mask), _mm256_loadu_si256(xs));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(wv, 2), mask),
                                               _mm256_loadu_si256(xs + 2)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(wv, 4), mask),
                                               _mm256_loadu_si256(xs + 4)));
  s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(wv, 6), mask),
                                               _mm256_loadu_si256(xs + 6)));
  return s;
}

}  // namespace

// quantize_token with 8 lanes: max|x| by vmaxps (the largest of finite values, in any order, is the same
// value; a NaN or an infinity is caught by the finiteness test and makes the token NaN whatever s is), the
// same product, rounding (half to even: nearbyint in the default mode) and clamp, narrowed to bytes 32 at
// a time.
bool quantize_token_avx2(const float* x, int64_t K, int8_t* q, float* s_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 largest = _mm256_set1_ps(std::numeric_limits<float>::max());
  __m256 m8 = _mm256_setzero_ps(), finite8 = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), abs_mask);
    finite8 = _mm256_and_ps(finite8, _mm256_cmp_ps(a, largest, _CMP_LE_OQ));  // false for NaN and infinity
    m8 = _mm256_max_ps(m8, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m8);
  float m = 0.0f;
  for (float v : lanes) m = v > m ? v : m;
  bool finite = _mm256_movemask_ps(finite8) == 0xff;
  for (; k < K; ++k) {
    const float a = std::fabs(x[k]);
    finite &= a <= std::numeric_limits<float>::max();
    m = a > m ? a : m;
  }
  const float s = token_scale(m);
  *s_out = s;
  if (!finite) {
    std::fill(q, q + K, int8_t{0});
    return false;
  }
  const __m256 s8 = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  auto ints = [&](int64_t i) {  // 8 values rounded and clamped, as int32
    const __m256 v =
        _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), s8), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
  };
  k = 0;
  for (; k + 32 <= K; k += 32) {
    // packs interleave the 128-bit lanes: (a0 b0 a1 b1) words, (a0 b0 c0 d0 a1 b1 c1 d1) bytes; a final
    // permute of 32-bit groups restores the order
    const __m256i ab = _mm256_packs_epi32(ints(k), ints(k + 8));
    const __m256i cd = _mm256_packs_epi32(ints(k + 16), ints(k + 24));
    const __m256i bytes = _mm256_packs_epi16(ab, cd);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + k),
                        _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
  for (; k < K; ++k) q[k] = quantize_value(x[k], s);
  return true;
}

void chunk_dot_avx2(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {  // four rows share every activation load
    const uint8_t* w0 = w + r * row_bytes;
    const uint8_t* w1 = w0 + row_bytes;
    const uint8_t* w2 = w1 + row_bytes;
    const uint8_t* w3 = w2 + row_bytes;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* xc = xperm + 256 * c;
      const int64_t o = 64 * c;
      // a chunk's eight int16 products per lane stay within +-4096: widen once per chunk
      __m256i s0 = _mm256_add_epi16(half_dot(w0 + o, xc, 0, mask), half_dot(w0 + o + 32, xc, 1, mask));
      __m256i s1 = _mm256_add_epi16(half_dot(w1 + o, xc, 0, mask), half_dot(w1 + o + 32, xc, 1, mask));
      __m256i s2 = _mm256_add_epi16(half_dot(w2 + o, xc, 0, mask), half_dot(w2 + o + 32, xc, 1, mask));
      __m256i s3 = _mm256_add_epi16(half_dot(w3 + o, xc, 0, mask), half_dot(w3 + o + 32, xc, 1, mask));
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(s0, ones));
      a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(s1, ones));
      a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(s2, ones));
      a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(s3, ones));
    }
    dot[r] = hsum(a0);
    dot[r + 1] = hsum(a1);
    dot[r + 2] = hsum(a2);
    dot[r + 3] = hsum(a3);
  }
  for (; r < rows; ++r) {
    const uint8_t* w0 = w + r * row_bytes;
    __m256i a0 = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* xc = xperm + 256 * c;
      const __m256i s0 = _mm256_add_epi16(half_dot(w0 + 64 * c, xc, 0, mask), half_dot(w0 + 64 * c + 32, xc, 1, mask));
      a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(s0, ones));
    }
    dot[r] = hsum(a0);
  }
}

namespace {

// R rows x T tokens: each 32 packed bytes are unpacked once (shift, mask) for all T tokens; the R
// rows' codes are read once, in memory order, with the lines kPrefetchBytes ahead requested as they go.
template <int R, int T>
void rows_pass(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
               int32_t* dot, int64_t dot_stride) {
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
  for (int64_t c = 0; c < chunks; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64 * (R * c + r)), _MM_HINT_T1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m256i s[T];  // a chunk's eight int16 products per lane stay within +-4096: widen once per chunk
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) s[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + 64 * c + 32 * h));
        const __m256i p[4] = {_mm256_and_si256(wv, mask), _mm256_and_si256(_mm256_srli_epi16(wv, 2), mask),
                              _mm256_and_si256(_mm256_srli_epi16(wv, 4), mask),
                              _mm256_and_si256(_mm256_srli_epi16(wv, 6), mask)};
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const int8_t* xs = xperm + t * x_stride + 256 * c + 32 * h;
#pragma GCC unroll 8
          for (int i = 0; i < 4; ++i) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs + 64 * i));
            s[t] = _mm256_add_epi16(s[t], _mm256_maddubs_epi16(p[i], x));
          }
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s[t], ones));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) dot[t * dot_stride + r] = hsum(acc[r][t]);
}

// Rows [0, rows) of T tokens: R at a time, then one at a time.
template <int R, int T>
void rows_of_tokens(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                    int64_t rows, int32_t* dot, int64_t dot_stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    rows_pass<R, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, dot_stride);
  for (; r < rows; ++r) rows_pass<1, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, dot_stride);
}

}  // namespace

void rows_dot_avx2(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot) {
  // two tokens a pass over the rows (16 ymm registers); the next pair reads them again from L1/L2
  for (int64_t t = 0; t < tokens; t += 2) {
    const int8_t* xt = xperm + t * x_stride;
    int32_t* dt = dot + t * rows;
    switch (std::min<int64_t>(2, tokens - t)) {
      case 1: rows_of_tokens<4, 1>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
      case 2: rows_of_tokens<2, 2>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
      default: rows_of_tokens<2, 2>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
    }
  }
}

}  // namespace ternary
}  // namespace onebit

namespace onebit {

// rms::normalize compiled for AVX2: an 8-lane vector of the cascade is one ymm register.
void rms_norm_torch_order_avx2(const float* x, int64_t K, float eps, int lanes, float* y) {
  rms::normalize(x, K, eps, lanes, y);
}

}  // namespace onebit
