// RMSNorm in torch's rounding and sum order (see rms_norm.h), compiled for the baseline ISA, and the rows'
// driver.
#include "kernels/rms_norm.h"

#include "kernels/dispatch.h"
#include "kernels/isa.h"

namespace onebit {

void rms_norm_torch_order(const float* x, int64_t K, float eps, int lanes, float* y) {
  rms::normalize(x, K, eps, lanes, y);
}

void rms_norm_rows(const float* x, int64_t N, int64_t K, int64_t x_stride, float eps, int lanes, float* y) {
  const RmsNormRow isa_norm = isa_kernels(active_isa()).rms_norm;
  const RmsNormRow norm = isa_norm ? isa_norm : rms_norm_torch_order;
  for (int64_t n = 0; n < N; ++n) norm(x + n * x_stride, K, eps, lanes, y + n * K);
}

}  // namespace onebit
