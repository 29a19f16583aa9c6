// RMSNorm without weight, rounded as torch's CPU `F.rms_norm` rounds it, so that a packed
// BitLinear can normalize its tokens inside the native call and keep the model's bits:
//
//   ss  = cascade_sum(fl(x[k] * x[k]))          torch's sum order, below
//   m   = fl(fl(ss / K) + eps)                  eps as a float32
//   r   = fl(1 / fl(sqrt(m)))
//   y_k = fl(x_k * r)
//
// torch sums a contiguous row (ATen's SumKernel, `vectorized_inner_sum`) with vectors of L
// float lanes, L that of the build of the sum kernel (8 on x86-64 with AVX2 or AVX-512):
// the row's first floor(K / L) L-wide vectors are read as rows of 4 (four accumulators
// whose sums are carried up a cascade of 4 levels every 2^p vectors, p = max(4,
// ceil(log2(rows)) / 4)), the vectors after the last whole row of 4 go into accumulator
// 0, the four are added into the first, then the lanes are added one after another to the
// sum of the elements after the last whole vector. Other thread counts and very long rows
// may split the sum differently: onebit.engine.sum_order asks torch which order a shape
// gets before a packed model relies on it.
#pragma once
#include <cstdint>

namespace onebit {

// torch's cascade sum of x[k]^2 (each square rounded), k < K, with L-lane vectors; L is 4, 8 or 16.
float cascade_sum_of_squares(const float* x, int64_t K, int lanes);

// y[k] = x[k] * r as above; y may be x.
void rms_norm_torch_order(const float* x, int64_t K, float eps, int lanes, float* y);

}  // namespace onebit
