// A float32 tensor copied between NCHW and channels_last memory: each sample's [rows, cols] plane
// transposed into a contiguous [cols, rows] plane ([C, H*W] -> [H*W, C] and back).
//
// Elements move as 32-bit words, so every float's bits (NaN payloads, -0.0) arrive unchanged.
#pragma once
#include <cstdint>

#include "kernels/isa.h"

namespace onebit {

// dst[j * dst_ld + i] = src[i * src_ld + j] for i < rows, j < cols.
using TransposeBlock = void (*)(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                                int64_t dst_ld);

void transpose_block_reference(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                               int64_t dst_ld);
void transpose_block_scalar(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                            int64_t dst_ld);
#if ONEBIT_X86
void transpose_block_avx2(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                          int64_t dst_ld);
void transpose_block_avx512(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                            int64_t dst_ld);
#endif
#if ONEBIT_NEON
void transpose_block_neon(const uint32_t* src, int64_t rows, int64_t cols, int64_t src_ld, uint32_t* dst,
                          int64_t dst_ld);
#endif

// out[n, j, i] = x[n * sample_stride + i * row_stride + j] for n < N, i < rows, j < cols: out is contiguous
// [N, cols, rows]. Runs the active ISA's TransposeBlock on blocks of each plane, on up to `threads`
// threads (small copies stay on one).
void transpose_planes(const uint32_t* x, int64_t N, int64_t rows, int64_t cols, int64_t sample_stride,
                      int64_t row_stride, uint32_t* out, int threads);

}  // namespace onebit
