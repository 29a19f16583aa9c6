// NEON (aarch64) kernels of the ternary x int8 linear layer, for every core: the 2-bit codes
// (0, 1, 2 as signed bytes) times the activations by widening multiplies (smull / smlal2 into
// int16), widened pairwise into int32 (sadalp) once per 256-feature chunk; one token (chunk_dot)
// or two tokens a pass over the rows (rows_dot: each row's codes loaded once for both).
#include <arm_neon.h>

#include "kernels/ternary_linear.h"

namespace onebit {
namespace ternary {
namespace {

// Plane I of 16 packed bytes: the codes of features 4 j + I, as signed bytes.
template <int I>
inline int8x16_t plane(uint8x16_t packed) {
  return vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(packed, 2 * I), vdupq_n_u8(3)));
}

// part[r][k] += codes of R rows x token k's activations, one 16-byte segment t (64 features) of plane I
// of a chunk. Per int16 lane a chunk adds 32 products of |code * x| <= 256: |sum| <= 8192.
template <int I, int R, int T>
inline void plane_products(const uint8x16_t (&wv)[R], const int8_t* xc, int64_t x_stride, int t,
                           int16x8_t (&part)[R][T]) {
  int8x16_t code[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) code[r] = plane<I>(wv[r]);
#pragma GCC unroll 4
  for (int k = 0; k < T; ++k) {
    const int8x16_t xv = vld1q_s8(xc + k * x_stride + 64 * I + 16 * t);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      part[r][k] = vmlal_s8(part[r][k], vget_low_s8(code[r]), vget_low_s8(xv));
      part[r][k] = vmlal_high_s8(part[r][k], code[r], xv);
    }
  }
}

// dot[k * ld + r] = the sums of R rows x T tokens (token k's xperm at xperm + k * x_stride): each
// row's codes read once for the T tokens.
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
    int16x8_t part[R][T];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < T; ++k) part[r][k] = vdupq_n_s16(0);
    for (int t = 0; t < 4; ++t) {
      uint8x16_t wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = vld1q_u8(w + r * row_bytes + 64 * c + 16 * t);
      plane_products<0>(wv, xc, x_stride, t, part);
      plane_products<1>(wv, xc, x_stride, t, part);
      plane_products<2>(wv, xc, x_stride, t, part);
      plane_products<3>(wv, xc, x_stride, t, part);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < T; ++k) acc[r][k] = vpadalq_s16(acc[r][k], part[r][k]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < T; ++k) dot[k * ld + r] = vaddvq_s32(acc[r][k]);
}

// Every row of T tokens: 4 rows at a time (shared activation loads), then the last ones.
template <int T>
inline void all_rows(const int8_t* xperm, int64_t x_stride, int64_t chunks, const uint8_t* w, int64_t row_bytes,
                     int64_t rows, int32_t* dot, int64_t ld) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_tokens<4, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, ld);
  for (; r < rows; ++r) rows_tokens<1, T>(xperm, x_stride, chunks, w + r * row_bytes, row_bytes, dot + r, ld);
}

}  // namespace

bool quantize_token_neon(const float* x, int64_t K, int8_t* q, float* s_out) { return quantize_token(x, K, q, s_out); }

void chunk_dot_neon(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot) {
  all_rows<1>(xperm, 0, chunks, w, row_bytes, rows, dot, rows);
}

void rows_dot_neon(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot) {
  int64_t t = 0;
  for (; t + 2 <= tokens; t += 2) all_rows<2>(xperm + t * x_stride, x_stride, chunks, w, row_bytes, rows, dot + t * rows, rows);
  if (t < tokens) all_rows<1>(xperm + t * x_stride, x_stride, chunks, w, row_bytes, rows, dot + t * rows, rows);
}

}  // namespace ternary
}  // namespace onebit
