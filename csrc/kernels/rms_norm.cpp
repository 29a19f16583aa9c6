// RMSNorm in torch's rounding and sum order (see rms_norm.h), compiled for the baseline ISA.
#include "kernels/rms_norm.h"

namespace onebit {

void rms_norm_torch_order(const float* x, int64_t K, float eps, int lanes, float* y) {
  rms::normalize(x, K, eps, lanes, y);
}

}  // namespace onebit
