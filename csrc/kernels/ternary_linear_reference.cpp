// The portable reference of the ternary x int8 linear layer: plain loops (see ternary_linear.h).
#include "kernels/ternary_linear.h"

namespace onebit {
namespace ternary {

void ternary_rows_reference(const int8_t* q, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t rows,
                            int32_t* acc) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = w + r * row_bytes;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
      const int code = (row[k >> 2] >> (2 * (k & 3))) & 3;
      sum += static_cast<int32_t>(q[k]) * (code - 1);
    }
    acc[r] = sum;
  }
}

}  // namespace ternary
}  // namespace onebit
