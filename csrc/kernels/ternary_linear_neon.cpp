// NEON (aarch64) kernel of the ternary x int8 linear layer, for every core: the 2-bit codes
// (0, 1, 2 as signed bytes) times the activations by widening multiplies (smull / smlal2 into
// int16), widened pairwise into int32 (sadalp) once per 256-feature chunk.
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

// acc[r] += codes x activations of one 16-byte segment t (64 features) of R rows' chunk.
// Per int16 lane a chunk adds 32 products of |code * x| <= 256: |sum| <= 8192.
template <int I, int R>
inline void plane_products(const uint8x16_t (&wv)[R], const int8_t* xc, int t, int16x8_t (&acc)[R]) {
  const int8x16_t xv = vld1q_s8(xc + 64 * I + 16 * t);
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
    const int8x16_t code = plane<I>(wv[r]);
    acc[r] = vmlal_s8(acc[r], vget_low_s8(code), vget_low_s8(xv));
    acc[r] = vmlal_high_s8(acc[r], code, xv);
  }
}

template <int R>
inline void rows_dot(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int32_t* dot) {
  int32x4_t acc[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) acc[r] = vdupq_n_s32(0);
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* xc = xperm + 256 * c;
    int16x8_t part[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) part[r] = vdupq_n_s16(0);
    for (int t = 0; t < 4; ++t) {
      uint8x16_t wv[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) wv[r] = vld1q_u8(w + r * row_bytes + 64 * c + 16 * t);
      plane_products<0>(wv, xc, t, part);
      plane_products<1>(wv, xc, t, part);
      plane_products<2>(wv, xc, t, part);
      plane_products<3>(wv, xc, t, part);
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = vpadalq_s16(acc[r], part[r]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) dot[r] = vaddvq_s32(acc[r]);
}

}  // namespace

bool quantize_token_neon(const float* x, int64_t K, int8_t* q, float* s_out) { return quantize_token(x, K, q, s_out); }

void chunk_dot_neon(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) rows_dot<4>(xperm, chunks, w + r * row_bytes, row_bytes, dot + r);  // shared loads
  for (; r < rows; ++r) rows_dot<1>(xperm, chunks, w + r * row_bytes, row_bytes, dot + r);
}

}  // namespace ternary
}  // namespace onebit
