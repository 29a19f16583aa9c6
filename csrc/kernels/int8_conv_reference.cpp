// The portable int8 GEMM of the int8 conv: plain loops over the panels (see int8_conv.h).
#include "kernels/int8_conv.h"

namespace onebit {
namespace int8 {

void gemm_reference(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
                    const int32_t* /*wsum*/, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t lane = 0; lane < kChannelBlock; ++lane) {
        int32_t sum = 0;
        for (int64_t k = 0; k < quads * kTapGroup; ++k)
          sum += static_cast<int32_t>(a[p * a_stride + k]) *
                 static_cast<int32_t>(w[((b * quads + k / kTapGroup) * kChannelBlock + lane) * kTapGroup + k % kTapGroup]);
        acc[p * acc_stride + b * kChannelBlock + lane] = sum;
      }
}

}  // namespace int8
}  // namespace onebit
