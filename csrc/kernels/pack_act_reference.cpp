#include "kernels/pack.h"

namespace onebit {

// The reference: one float at a time, any strides.
void pack_row_strided_reference(const float* x, int64_t W, int64_t sW, int64_t sC, int64_t Cg, int64_t G,
                                uint64_t* out) {
  const int64_t Wg = words_for(Cg);
  for (int64_t w = 0; w < W; ++w) {
    uint64_t* px = out + w * G * Wg;
    for (int64_t i = 0; i < G * Wg; ++i) px[i] = 0;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < Cg; ++c)
        if (x[w * sW + (g * Cg + c) * sC] < 0.0f) px[g * Wg + c / 64] |= uint64_t{1} << (c % 64);
  }
}

}  // namespace onebit
