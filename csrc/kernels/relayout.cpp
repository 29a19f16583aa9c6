// The plane transpose's driver: the active ISA's TransposeBlock on blocks of each sample's plane,
// split over threads for big copies.
#include "kernels/relayout.h"

#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/parallel.h"

namespace onebit {
namespace {

// A block of a plane: 16 elements across its short side (the width of one AVX-512 tile) and 1024
// along its long side. The rows of the long side lie a whole plane's row apart, often a multiple of
// 4 KB that maps them to a few cache sets: a block touches only 16 of them, each along 4 KB.
constexpr int64_t kBlockShort = 16, kBlockLong = 1024;
// Below this many elements per thread, waking a thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 16;

}  // namespace

void transpose_planes(const uint32_t* x, int64_t N, int64_t rows, int64_t cols, int64_t sample_stride,
                      int64_t row_stride, uint32_t* out, int threads) {
  if (N <= 0 || rows <= 0 || cols <= 0) return;
  TransposeBlock block = isa_kernels(active_isa()).transpose_block;
  if (block == nullptr) block = transpose_block_reference;
  const bool wide = rows <= cols;
  const int64_t block_rows = wide ? kBlockShort : kBlockLong, block_cols = wide ? kBlockLong : kBlockShort;
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows, col_blocks = (cols + block_cols - 1) / block_cols;
  const int64_t per_sample = row_blocks * col_blocks, blocks = N * per_sample;
  const auto run = [&](int64_t b) {  // blocks in order: sample, row block, column block
    const int64_t n = b / per_sample, i = (b % per_sample) / col_blocks * block_rows, j = b % col_blocks * block_cols;
    const int64_t nr = rows - i < block_rows ? rows - i : block_rows;
    const int64_t nc = cols - j < block_cols ? cols - j : block_cols;
    block(x + n * sample_stride + i * row_stride + j, nr, nc, row_stride, out + (n * cols + j) * rows + i, rows);
  };
  parallel_tasks(threads, blocks, N * rows * cols, kMinElementsPerThread, 8, run);
}

}  // namespace onebit
