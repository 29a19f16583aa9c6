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
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace onebit {

// y[k] = x[k] * r as above; y may be x.
void rms_norm_torch_order(const float* x, int64_t K, float eps, int lanes, float* y);
// The same for rows n < N of x (row stride x_stride) into y [N, K], by the active ISA's copy
// (IsaKernels::rms_norm): what a packed BitLinear's call runs.
void rms_norm_rows(const float* x, int64_t N, int64_t K, int64_t x_stride, float eps, int lanes, float* y);
// The same compiled for AVX2 (ternary_linear_avx2.cpp: each lane of a vector one chain of adds, so the
// L = 8 sums run in ymm registers); IsaKernels::rms_norm.
void rms_norm_torch_order_avx2(const float* x, int64_t K, float eps, int lanes, float* y);

namespace rms {
namespace {  // internal linkage: each file's copy is built for its own ISA, and no copy can stand in for another

// Plain loops: every lane of a vector is its own chain of float adds, so a compiler may vectorize them
// freely.
constexpr int kLevels = 4;  // cascade levels of ATen's multi_row_sum
constexpr int kIlp = 4;     // accumulators of ATen's row_sum

inline int ceil_log2(int64_t x) {  // ATen's utils::CeilLog2: 1 for x <= 2
  if (x <= 2) return 1;
  int bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x) - 1; v; v >>= 1) ++bits;
  return bits;
}

template <int L>
struct Vec {
  float v[L];
  void zero() {
    for (int l = 0; l < L; ++l) v[l] = 0.0f;
  }
  void add(const Vec& o) {
    for (int l = 0; l < L; ++l) v[l] += o.v[l];
  }
  void add_squares(const float* x) {
    for (int l = 0; l < L; ++l) v[l] += x[l] * x[l];  // -ffp-contract=off: square rounded, then added
  }
};

// ATen's row_sum over `vectors` L-wide vectors of squares starting at x. Level 0's accumulators are kept
// apart from the levels above (only ever indexed by constants), so that a compiler keeps them in registers.
template <int L>
inline Vec<L> row_sum(const float* x, int64_t vectors) {
  const int64_t size = vectors / kIlp;  // rows of kIlp vectors (multi_row_sum's size)
  const int power = std::max(4, ceil_log2(size) / kLevels);
  const int64_t step = int64_t{1} << power, mask = step - 1;
  Vec<L> a[kIlp];             // level 0
  Vec<L> up[kLevels][kIlp];   // levels 1 .. kLevels - 1 (up[0] unused)
  for (auto& v : a) v.zero();
  for (auto& level : up)
    for (auto& v : level) v.zero();
  int64_t i = 0;
  for (; i + step <= size;) {
    for (int64_t j = 0; j < step; ++j, ++i)
#pragma GCC unroll 4
      for (int k = 0; k < kIlp; ++k) a[k].add_squares(x + (i * kIlp + k) * L);
    // level j += level j - 1, which restarts from 0, up the levels until i is not a multiple of step^j
#pragma GCC unroll 4
    for (int k = 0; k < kIlp; ++k) {
      up[1][k].add(a[k]);
      a[k].zero();
    }
    for (int j = 2; j < kLevels && (i & (mask << ((j - 1) * power))) == 0; ++j)
      for (int k = 0; k < kIlp; ++k) {
        up[j][k].add(up[j - 1][k]);
        up[j - 1][k].zero();
      }
  }
  for (; i < size; ++i)
#pragma GCC unroll 4
    for (int k = 0; k < kIlp; ++k) a[k].add_squares(x + (i * kIlp + k) * L);
  for (int j = 1; j < kLevels; ++j)
#pragma GCC unroll 4
    for (int k = 0; k < kIlp; ++k) a[k].add(up[j][k]);
  Vec<L> sum = a[0];
  for (int64_t v = size * kIlp; v < vectors; ++v) sum.add_squares(x + v * L);
  for (int k = 1; k < kIlp; ++k) sum.add(a[k]);
  return sum;
}

template <int L>
inline float inner_sum(const float* x, int64_t K) {
  const int64_t vectors = K / L;
  const Vec<L> lanes = row_sum<L>(x, vectors);
  float total = 0.0f;
  for (int64_t k = vectors * L; k < K; ++k) total += x[k] * x[k];
  for (int l = 0; l < L; ++l) total += lanes.v[l];
  return total;
}

inline float sum_of_squares(const float* x, int64_t K, int lanes) {
  // ATen sums a row shorter than one vector with scalar_inner_sum: row_sum over single floats
  if (K < lanes) return inner_sum<1>(x, K);
  if (lanes == 16) return inner_sum<16>(x, K);
  if (lanes == 4) return inner_sum<4>(x, K);
  return inner_sum<8>(x, K);
}

inline void normalize(const float* x, int64_t K, float eps, int lanes, float* y) {
  const float m = sum_of_squares(x, K, lanes) / static_cast<float>(K) + eps;
  const float r = 1.0f / std::sqrt(m);
  for (int64_t k = 0; k < K; ++k) y[k] = x[k] * r;
}

}  // namespace
}  // namespace rms
}  // namespace onebit
