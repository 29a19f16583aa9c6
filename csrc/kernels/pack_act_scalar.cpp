#include "kernels/pack.h"

namespace onebit {

void pack_row_cl_scalar(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg);
  for (int64_t w = 0; w < W; ++w)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = x + w * sW + g * Cg;
      uint64_t* dst = out + (w * G + g) * Wg;
      for (int64_t k = 0; k < Wg; ++k) {
        const int64_t count = Cg - 64 * k < 64 ? Cg - 64 * k : 64;
        uint64_t word = 0;
        for (int64_t j = 0; j < count; ++j) word |= static_cast<uint64_t>(src[64 * k + j] < 0.0f) << j;
        dst[k] = word;
      }
    }
}

// Pixels contiguous: sweep each channel along the row, OR-ing its bit into every pixel's word.
void pack_row_nchw_scalar(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg), px = G * Wg;
  for (int64_t w = 0; w < W; ++w)
    for (int64_t i = 0; i < px; ++i) out[w * px + i] = 0;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < Cg; ++c) {
      const float* src = x + (g * Cg + c) * sC;
      uint64_t* dst = out + g * Wg + c / 64;
      const int shift = static_cast<int>(c % 64);
      for (int64_t w = 0; w < W; ++w) dst[w * px] |= static_cast<uint64_t>(src[w] < 0.0f) << shift;
    }
}

}  // namespace onebit
