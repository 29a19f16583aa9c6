// AVX-512 VNNI kernel of the ternary x int8 linear layer: vpdpbusd on the unpacked 2-bit codes.
#include <immintrin.h>

#include <algorithm>

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

namespace {

// acc += dpbusd(u, s) in place (GCC otherwise copies every loop-carried accumulator each use).
inline void dpbusd(__m512i& acc, __m512i u, __m512i s) { __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s)); }

// R rows x T tokens a pass, one accumulator each: every 64 packed bytes are loaded and unpacked
// (shift, mask) once for the T tokens, every activation vector loaded once for the R rows; the rows'
// codes are read in memory order, the lines kPrefetchBytes ahead requested into L2 as they go.
template <int R, int T>
void rows_pass(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
               int32_t* dot, int64_t dot_stride) {
  const __m512i mask = _mm512_set1_epi8(3);
  __m512i acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64 * (R * c + r)), _MM_HINT_T1);
      wv[r] = _mm512_loadu_si512(w + r * row_bytes + 64 * c);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 4; ++i) {
      __m512i x[T];
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) x[t] = _mm512_loadu_si512(xperm + t * x_stride + 256 * c + 64 * i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_and_si512(i == 0 ? wv[r] : _mm512_srli_epi16(wv[r], 2 * i), mask);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) dpbusd(acc[r][t], p, x[t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) dot[t * dot_stride + r] = _mm512_reduce_add_epi32(acc[r][t]);
}

// The same with each 2-bit plane masked in place, (byte & 3 << 2i) = 4^i code: four ANDs unpack 64
// bytes (no shifts); plane i's accumulator holds 4^i sum(code x), exact, every lane a multiple of 4^i,
// undone by a shift at the end. Four accumulators a row and token.
template <int R, int T>
void rows_pass_planes(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                      int32_t* dot, int64_t dot_stride) {
  const __m512i m[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0c), _mm512_set1_epi8(0x30),
                        _mm512_set1_epi8(static_cast<char>(0xc0))};
  __m512i acc[R][T][4];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) acc[r][t][i] = _mm512_setzero_si512();
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + 64 * (R * c + r)), _MM_HINT_T1);
      wv[r] = _mm512_loadu_si512(w + r * row_bytes + 64 * c);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512i x[T];
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) x[t] = _mm512_loadu_si512(xperm + t * x_stride + 256 * c + 64 * i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_and_si512(wv[r], m[i]);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) dpbusd(acc[r][t][i], p, x[t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      __m512i v = _mm512_add_epi32(acc[r][t][0], _mm512_srai_epi32(acc[r][t][1], 2));
      v = _mm512_add_epi32(v, _mm512_add_epi32(_mm512_srai_epi32(acc[r][t][2], 4), _mm512_srai_epi32(acc[r][t][3], 6)));
      dot[t * dot_stride + r] = _mm512_reduce_add_epi32(v);
    }
}

// Rows [0, rows) of T tokens: R at a time, then one at a time.
template <int R, int T, bool Planes>
void rows_of_tokens(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                    int64_t rows, int32_t* dot, int64_t dot_stride) {
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    if (Planes) rows_pass_planes<R, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, dot_stride);
    else rows_pass<R, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, dot_stride);
  for (; r < rows; ++r) rows_pass<1, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, dot_stride);
}

}  // namespace

void rows_dot_vnni(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot) {
  // up to four tokens a pass over the rows (the next four read them again from L1/L2); one or two
  // tokens take the plane-masked pass (fewer unpacking ops where they, not the products, bound it)
  for (int64_t t = 0; t < tokens; t += 4) {
    const int8_t* xt = xperm + t * x_stride;
    int32_t* dt = dot + t * rows;
    switch (std::min<int64_t>(4, tokens - t)) {
      case 1: rows_of_tokens<4, 1, true>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
      case 2: rows_of_tokens<2, 2, true>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
      case 3: rows_of_tokens<4, 3, false>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
      default: rows_of_tokens<4, 4, false>(xt, x_stride, chunks, w, row_bytes, rows, dt, rows); break;
    }
  }
}

}  // namespace ternary
}  // namespace onebit
