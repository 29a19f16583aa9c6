// The portable reference of the plane transpose: one element at a time.
#include "kernels/relayout.h"

namespace onebit {

void transpose_block_reference(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                               int64_t dst_ld) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_ld + i] = src[i * src_ld + j];
}

}  // namespace onebit
