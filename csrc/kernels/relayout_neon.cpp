// NEON (aarch64) plane transpose: 4 x 4 tiles of 32-bit words in registers (two rounds of
// vtrn: 32-bit pairs, then 64-bit halves); the block's ragged edges one element at a time.
#include <arm_neon.h>

#include "kernels/relayout.h"

namespace onebit {

void transpose_block_neon(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                          int64_t dst_ld) {
  const int64_t rows4 = rows / 4 * 4, cols4 = cols / 4 * 4;
  for (int64_t i = 0; i < rows4; i += 4)
    for (int64_t j = 0; j < cols4; j += 4) {
      const uint32_t* s = src + i * src_ld + j;
      const uint32x4x2_t t01 = vtrnq_u32(vld1q_u32(s), vld1q_u32(s + src_ld));
      const uint32x4x2_t t23 = vtrnq_u32(vld1q_u32(s + 2 * src_ld), vld1q_u32(s + 3 * src_ld));
      // t01: (a0 b0 a2 b2) (a1 b1 a3 b3); column k of rows a..d = (a_k b_k c_k d_k)
      uint32_t* d = dst + j * dst_ld + i;
      vst1q_u32(d, vreinterpretq_u32_u64(vtrn1q_u64(vreinterpretq_u64_u32(t01.val[0]), vreinterpretq_u64_u32(t23.val[0]))));
      vst1q_u32(d + dst_ld,
                vreinterpretq_u32_u64(vtrn1q_u64(vreinterpretq_u64_u32(t01.val[1]), vreinterpretq_u64_u32(t23.val[1]))));
      vst1q_u32(d + 2 * dst_ld,
                vreinterpretq_u32_u64(vtrn2q_u64(vreinterpretq_u64_u32(t01.val[0]), vreinterpretq_u64_u32(t23.val[0]))));
      vst1q_u32(d + 3 * dst_ld,
                vreinterpretq_u32_u64(vtrn2q_u64(vreinterpretq_u64_u32(t01.val[1]), vreinterpretq_u64_u32(t23.val[1]))));
    }
  for (int64_t i = 0; i < rows; ++i)  // the right edge (columns >= cols4) and the bottom edge (rows >= rows4)
    for (int64_t j = i < rows4 ? cols4 : 0; j < cols; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
}

}  // namespace onebit
