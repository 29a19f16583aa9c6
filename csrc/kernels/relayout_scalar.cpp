// Scalar plane transpose: 8 x 8 tiles, so each tile's source rows and destination rows stay in cache.
#include "kernels/relayout.h"

namespace onebit {

void transpose_block_scalar(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                            int64_t dst_ld) {
  constexpr int64_t kTile = 8;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = i0 + kTile < rows ? i0 + kTile : rows;
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = j0 + kTile < cols ? j0 + kTile : cols;
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    }
  }
}

}  // namespace onebit
