// NEON kernels of the ternary x int8 linear layer for cores with dotprod (Armv8.2 SDOT): each
// vdotq_s32 adds four code x activation products into every int32 lane; one token (chunk_dot) or
// two a pass over the rows (rows_dot). Built with +dotprod and
// run only where the CPU reports it (dispatch.cpp): elsewhere sdot is an illegal instruction.
#include <arm_neon.h>

#include "kernels/ternary_linear.h"

namespace onebit {
namespace ternary {
namespace {

template <int I>
inline int8x16_t plane(uint8x16_t packed) {
  return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 2 * I), vdupq_n_u8(3)));
}

// acc[r][k] += SDOT of R rows' codes and token k's activations, segment t of plane I of a chunk.
template <int I, int R, int T>
inline void plane_dots(const uint8x16_t (&wv)[R], const int8_t* xc, int64_t x_stride, int t, int32x4_t (&acc)[R][T]) {
  int8x16_t code[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) code[r] = plane<I>(wv[r]);
#pragma GCC unroll 4
  for (int k = 0; k < T; ++k) {
    const int8x16_t xv = vld1q_s8(xc + k * x_stride + 64 * I + 16 * t);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][k] = vdotq_s32(acc[r][k], code[r], xv);
  }
}

// dot[k * ld + r] = the sums of R rows x T tokens, each row's codes read once for the T tokens.
template <int R, int T>
inline void rows_tokens(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                        int32_t* dot, int64_t ld) {
  int32x4_t acc[R][T];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < T; ++k) acc[r][k] = vdupq_n_s32(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* xc = xperm + 256 * c;
    for (int t = 0; t < 4; ++t) {
      uint8x16_t wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = vld1q_u8(w + r * row_bytes + 64 * c + 16 * t);
      plane_dots<0>(wv, xc, x_stride, t, acc);
      plane_dots<1>(wv, xc, x_stride, t, acc);
      plane_dots<2>(wv, xc, x_stride, t, acc);
      plane_dots<3>(wv, xc, x_stride, t, acc);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < T; ++k) dot[k * ld + r] = vaddvq_s32(acc[r][k]);
}

template <int T>
inline void all_rows(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                     int64_t rows, int32_t* dot, int64_t ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_tokens<4, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, ld);
  for (; r < rows; ++r) rows_tokens<1, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, ld);
}

}  // namespace

void chunk_dot_neon_dotprod(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                            int32_t* dot) {
  all_rows<1>(xperm, 0, chunks, w, row_bytes, rows, dot, rows);
}

void rows_dot_neon_dotprod(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                           int64_t row_bytes, int64_t rows, int32_t* dot) {
  int64_t t = 0;
  for (; t + 2 <= tokens; t += 2) all_rows<2>(xperm + t * x_stride, x_stride, chunks, w, row_bytes, rows, dot + t * rows, rows);
  if (t < tokens) all_rows<1>(xperm + t * x_stride, x_stride, chunks, w, row_bytes, rows, dot + t * rows, rows);
}

}  // namespace ternary
}  // namespace onebit
