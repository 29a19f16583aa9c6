// Ternary weights x int8 activations: BitNet b1.58's linear layer, exact in integers.
//
// Weights are 2-bit codes, code = w + 1 in {0, 1, 2} for w in {-1, 0, +1} (3 never occurs),
// four to a byte in input order: weight k of a row is bits 2 (k % 4) .. 2 (k % 4) + 1 of the
// row's byte k / 4; a row holds ceil(K / 4) bytes, its unused high bits are 0. This is also
// the file format (2 bits a weight).
//
// A token x (float32 [K]) is quantized as the layer does it (onebit.quant_lowbit.Absmax8):
//   s = 127 / max(max|x|, 1e-5),  q = clamp(round_half_even(x * s), -128, 127)  (int8),
// then acc[o] = sum_k q[k] * w[o][k] is an exact int32, and
//   out[o] = fl(fl(fl(float(acc) / s) * scale[o]) + bias[o])
// (no fused multiply-add). A token holding a NaN or an infinity gives a row of NaN.
//
// The optimized kernels use sum_k q * w = sum_k q * code - sum_k q, with the codes as unsigned
// and the activations as signed bytes (AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd, NEON vmull_s8 / SDOT). They see the
// activations permuted per 256-feature chunk so that each unpacked 2-bit plane lines up with
// them: xperm[256 c + 64 i + j] = q[256 c + 4 j + i] (j < 64, i < 4); byte j of a row's chunk c
// then feeds lane j of plane i. Features beyond the last full chunk run as plain loops.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace onebit {

inline int64_t ternary_row_bytes(int64_t K) { return (K + 3) / 4; }

// int32 [N, O] accumulators of int8 [N, K] activations (row-major) and packed weights [O, ceil(K/4)].
void ternary_linear_int(const int8_t* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int32_t* out,
                        int threads);

// float32 [N, O] of float32 [N, K] tokens (row stride x_stride elements); scale and bias [O] or null.
// norm_lanes > 0: each token is first normalized by rms_norm_torch_order(x, K, norm_eps, norm_lanes)
// (BitLinear's RMSNorm, rms_norm.h); 0: the tokens are used as they are.
void ternary_linear(const float* x, int64_t N, int64_t K, int64_t x_stride, const uint8_t* w, int64_t O,
                    const float* scale, const float* bias, float* out, int threads, int norm_lanes = 0,
                    float norm_eps = 0.0f);

// The name of the kernel the active ISA runs: "avx512_vnni", "avx2", "neon_dotprod", "neon" or "reference".
const char* ternary_linear_kernel();

namespace ternary {

// dot[r] = sum over `chunks` 256-feature chunks of xperm * code, for rows r < rows, where row r's
// codes start at w + r * row_bytes. The unsigned sum, before subtracting sum(q).
using ChunkDot = void (*)(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                          int32_t* dot);

// dot[n * rows + r]: the same sums for tokens n < tokens (token n's xperm at xperm + n * x_stride) and
// rows r < rows. The rows' codes are read once for all the tokens, in memory order (one sequential
// stream, prefetched kPrefetchBytes ahead), so a cold layer streams from memory once per call.
using RowsDot = void (*)(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                         int64_t row_bytes, int64_t rows, int32_t* dot);
constexpr int64_t kPrefetchBytes = 8192;  // into L2: about two row passes ahead of the loads

// Absmax8's scale of a token whose largest |x| is m: s = 127 / max(m, 1e-5).
static inline float token_scale(float m) { return 127.0f / (m > 1e-5f ? m : 1e-5f); }

// One value quantized with scale s: round(x s), half to even as torch.round, clamped to [-128, 127].
static inline int8_t quantize_value(float x, float s) {
  float v = std::nearbyint(x * s);
  v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
  return static_cast<int8_t>(v);
}

// Quantizes one token into q as Absmax8 does and stores s; false when the token holds a NaN or an
// infinity (q is then all 0). `static`: every file compiles its own copy with its own vector ISA
// (the AVX2 file's copy is vectorized), and no copy can stand in for another at link time.
static inline bool quantize_token(const float* x, int64_t K, int8_t* q, float* s_out) {
  float m = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    finite &= a <= std::numeric_limits<float>::max();  // false for NaN and infinity
    m = a > m ? a : m;
  }
  const float s = token_scale(m);
  *s_out = s;
  for (int64_t k = 0; k < K; ++k) q[k] = finite ? quantize_value(x[k], s) : int8_t{0};
  return finite;
}

// quantize_token compiled for AVX2 (ternary_linear_avx2.cpp).
bool quantize_token_avx2(const float* x, int64_t K, int8_t* q, float* s_out);

void chunk_dot_avx2(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot);
void chunk_dot_vnni(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot);
void rows_dot_avx2(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot);
void rows_dot_vnni(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot);
// aarch64: widening multiplies (vmull_s8 / vpadalq_s16) on every core, SDOT (vdotq_s32) with dotprod.
bool quantize_token_neon(const float* x, int64_t K, int8_t* q, float* s_out);
void chunk_dot_neon(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                    int32_t* dot);
void chunk_dot_neon_dotprod(const int8_t* xperm, int64_t chunks, const uint8_t* w, int64_t row_bytes, int64_t rows,
                            int32_t* dot);
void rows_dot_neon(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                   int64_t row_bytes, int64_t rows, int32_t* dot);
void rows_dot_neon_dotprod(const int8_t* xperm, int64_t x_stride, int64_t tokens, int64_t chunks, const uint8_t* w,
                           int64_t row_bytes, int64_t rows, int32_t* dot);

// The reference: plain loops over the 2-bit codes, acc[r] = sum_k q[k] * (code - 1), no permutation.
void ternary_rows_reference(const int8_t* q, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t rows,
                            int32_t* acc);

}  // namespace ternary
}  // namespace onebit
