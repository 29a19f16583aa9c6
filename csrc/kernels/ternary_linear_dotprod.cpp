// NEON kernel of the ternary x int8 linear layer for cores with dotprod (Armv8.2 SDOT): each
// vdotq_s32 adds four code x activation products into every int32 lane. Built with +dotprod and
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

template <int I, int R>
inline void plane_dots(const uint8x16_t (&wv)[R], const int8_t* xc, int t, int32x4_t (&acc)[R]) {
  const int8x16_t xv = vld1q_s8(xc + 64 * I + 16 * t);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = vdotq_s32(acc[r], plane<I>(wv[r]), xv);
}

template <int R>
inline void rows_dot(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int32_t* dot) {
  int32x4_t acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = vdupq_n_s32(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* xc = xperm + 256 * c;
    for (int t = 0; t < 4; ++t) {
      uint8x16_t wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = vld1q_u8(w + r * row_bytes + 64 * c + 16 * t);
      plane_dots<0>(wv, xc, t, acc);
      plane_dots<1>(wv, xc, t, acc);
      plane_dots<2>(wv, xc, t, acc);
      plane_dots<3>(wv, xc, t, acc);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) dot[r] = vaddvq_s32(acc[r]);
}

}  // namespace

void chunk_dot_neon_dotprod(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                            int32_t* dot) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_dot<4>(xperm, chunks, w + r * row_bytes, row_bytes, dot + r);
  for (; r < rows; ++r) rows_dot<1>(xperm, chunks, w + r * row_bytes, row_bytes, dot + r);
}

}  // namespace ternary
}  // namespace onebit
