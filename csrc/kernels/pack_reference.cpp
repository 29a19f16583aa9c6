#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/pack.h"

namespace onebit {

void pack_rows_reference(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  const int64_t words = words_for(channels);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    uint64_t* dst = out + r * words;
    for (int64_t w = 0; w < words; ++w) dst[w] = 0;
    for (int64_t c = 0; c < channels; ++c)
      if (row[c] < 0.0f) dst[c / 64] |= uint64_t{1} << (c % 64);
  }
}

// Scalar: the sign bit of every float, gathered 64 at a time. -0.0 has its sign
// bit set but means +1, so the bit is taken from (x < 0) rather than the raw bit.
void pack_rows_scalar(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  const int64_t words = words_for(channels);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * row_stride;
    uint64_t* dst = out + r * words;
    for (int64_t w = 0; w < words; ++w) {
      const int64_t begin = w * 64;
      const int64_t count = channels - begin < 64 ? channels - begin : 64;
      uint64_t word = 0;
      for (int64_t j = 0; j < count; ++j) word |= static_cast<uint64_t>(row[begin + j] < 0.0f) << j;
      dst[w] = word;
    }
  }
}

void pack_rows(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out) {
  isa_kernels(active_isa()).pack_rows(x, rows, channels, row_stride, out);
}

}  // namespace onebit
