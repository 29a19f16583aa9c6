// The float max pool's driver: each output pixel's valid taps as offsets, in torch's (kh, kw) order, for
// the active ISA's MaxPoolPixels; NCHW inputs go through a ring of input rows transposed to channels_last.
#include <algorithm>
#include <limits>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/parallel.h"
#include "kernels/pool_float.h"

namespace onebit {
namespace {

// Output rows per task of an NCHW input: its input rows are transposed once (the rows shared by
// neighbouring tasks twice).
constexpr int64_t kRowsPerRun = 8;
// Below this many output values per thread, waking a thread costs more than it saves.
constexpr int64_t kMinOutputsPerThread = int64_t{1} << 14;

MaxPoolPixels pixels_kernel() {
  const MaxPoolPixels k = isa_kernels(active_isa()).max_pool_pixels;
  return k != nullptr ? k : max_pool_pixels_reference;
}

TransposeBlock transpose_kernel() {
  const TransposeBlock k = isa_kernels(active_isa()).transpose_block;
  return k != nullptr ? k : transpose_block_reference;
}

// The input rows of output row oh's window that lie inside the input, in kh order; returns their number.
int valid_rows(const MaxPoolGeometry& g, int64_t oh, int64_t* ih) {
  int n = 0;
  for (int64_t k = 0; k < g.KH; ++k) {
    const int64_t r = oh * g.SH - g.PH + k * g.DH;
    if (r >= 0 && r < g.H) ih[n++] = r;
  }
  return n;
}

// offsets[t] = row_offset[i] + iw * col_step over the valid rows i and the valid columns iw of output
// column ow, row-major (torch's order); returns the number of taps.
int window(const MaxPoolGeometry& g, int64_t ow, const int64_t* row_offset, int rows, int64_t col_step,
           int64_t* offsets) {
  int t = 0;
  for (int i = 0; i < rows; ++i)
    for (int64_t k = 0; k < g.KW; ++k) {
      const int64_t iw = ow * g.SW - g.PW + k * g.DW;
      if (iw >= 0 && iw < g.W) offsets[t++] = row_offset[i] + iw * col_step;
    }
  return t;
}

// One row of outputs, dst[ow * C + c] for ow < OW, c < channels: the pixels whose windows lie wholly
// inside the input in one call (the same taps, shifted), the border pixels one at a time.
void pool_row(MaxPoolPixels pixels, const MaxPoolGeometry& g, const float* x, const int64_t* row_offset, int rows,
              int64_t col_step, int64_t channels, float* dst, int64_t* offsets, const PoolEpilogue* e) {
  const int64_t lo = (g.PW + g.SW - 1) / g.SW, last_start = g.W - 1 + g.PW - (g.KW - 1) * g.DW;
  const int64_t hi = last_start < 0 ? lo : std::max(lo, std::min(g.OW, last_start / g.SW + 1));
  for (int64_t ow = 0; ow < g.OW; ++ow) {
    if (ow == lo && hi > lo) {
      const int t = window(g, lo, row_offset, rows, col_step, offsets);
      pixels(x, offsets, t, g.SW * col_step, hi - lo, channels, dst + lo * g.C, g.C, e);
      ow = hi - 1;
      continue;
    }
    const int t = window(g, ow, row_offset, rows, col_step, offsets);
    if (t == 0) {  // a window of padding only (torch's pool starts from -inf; after a BatchNorm too)
      std::fill(dst + ow * g.C, dst + ow * g.C + channels, -std::numeric_limits<float>::infinity());
      continue;
    }
    pixels(x, offsets, t, 0, 1, channels, dst + ow * g.C, g.C, e);
  }
}

}  // namespace

void max_pool2d_float(const float* x, float* out, const MaxPoolGeometry& g, int threads, const PoolEpilogue* e) {
  if (g.N <= 0 || g.C <= 0 || g.OH <= 0 || g.OW <= 0) return;
  const MaxPoolPixels pixels = pixels_kernel();
  const int64_t taps = g.KH * g.KW, outputs = g.N * g.C * g.OH * g.OW;
  if (g.sC == 1) {  // channels_last: the taps are whole pixels of the input
    parallel_tasks(threads, g.N * g.OH, outputs, kMinOutputsPerThread, 8, [&](int64_t task) {
      const int64_t n = task / g.OH, oh = task % g.OH;
      std::vector<int64_t> ih(g.KH), offsets(taps);
      const int rows = valid_rows(g, oh, ih.data());
      for (int i = 0; i < rows; ++i) ih[i] *= g.sH;
      pool_row(pixels, g, x + n * g.sN, ih.data(), rows, g.sW, g.C, out + (n * g.OH + oh) * g.OW * g.C,
               offsets.data(), e);
    });
    return;
  }
  // NCHW (sW == 1): each input row a run of output rows reads is transposed once to [W][C], into a ring
  // of the last (KH - 1) * DH + 1 rows (rows shared by consecutive windows stay in place)
  const TransposeBlock transpose = transpose_kernel();
  const int64_t ring = (g.KH - 1) * g.DH + 1, runs = g.N * ((g.OH + kRowsPerRun - 1) / kRowsPerRun);
  parallel_tasks(threads, runs, outputs, kMinOutputsPerThread, 8, [&](int64_t task) {
    const int64_t per_sample = (g.OH + kRowsPerRun - 1) / kRowsPerRun, n = task / per_sample;
    const int64_t oh_begin = task % per_sample * kRowsPerRun, oh_end = std::min(g.OH, oh_begin + kRowsPerRun);
    std::vector<int64_t> ih(g.KH), offsets(taps), held(ring, -1);
    std::vector<float> rows_cl(ring * g.W * g.C);
    for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
      const int rows = valid_rows(g, oh, ih.data());
      for (int i = 0; i < rows; ++i) {
        const int64_t slot = ih[i] % ring;
        float* dst = rows_cl.data() + slot * g.W * g.C;
        if (held[slot] != ih[i]) {
          transpose(reinterpret_cast<const uint32_t*>(x + n * g.sN + ih[i] * g.sH), g.C, g.W, g.sC,
                    reinterpret_cast<uint32_t*>(dst), g.C);
          held[slot] = ih[i];
        }
        ih[i] = slot * g.W * g.C;
      }
      pool_row(pixels, g, rows_cl.data(), ih.data(), rows, g.C, g.C, out + (n * g.OH + oh) * g.OW * g.C,
               offsets.data(), e);
    }
  });
}

}  // namespace onebit
