// The portable int8 GEMM of the int8 conv: plain loops over the panels (see int8_conv.h).
#include "kernels/int8_conv.h"
#include "kernels/int8_conv_driver.h"

namespace onebit {
namespace int8 {

void gemm_reference(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
                    const int32_t* /*wsum*/, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t lane = 0; lane < kChannelBlock; ++lane) {
        int32_t sum = 0;
        const int8_t* panel = w + b * quads * kChannelBlock * kTapGroup;
        for (int64_t k = 0; k < quads * kTapGroup; ++k)
          sum += static_cast<int32_t>(a[p * a_stride + k]) *
                 static_cast<int32_t>(panel[((k / kTapGroup) * kChannelBlock + lane) * kTapGroup + k % kTapGroup]);
        acc[p * acc_stride + b * kChannelBlock + lane] = sum;
      }
}

bool conv_reference(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
                    float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return run_conv<gemm_reference>(conv, x, panels, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace int8
}  // namespace onebit
