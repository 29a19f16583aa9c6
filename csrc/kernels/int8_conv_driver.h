// The int8 conv's driver as a template over its GEMM kernel, compiled in each ISA's file with that
// file's flags (the quantization and the float epilogue vectorize to the ISA): quantization into
// [N, H, W, C] int8, im2col rows of kPixelBlock pixels, the GEMM, the epilogue (see int8_conv.h).
// Everything here has internal linkage: no copy compiled for one ISA can stand in for another's (and
// buffers are plain arrays, not std::vector, whose shared inline code would be compiled once per ISA).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/dispatch.h"
#include "kernels/int8_conv.h"
#include "kernels/parallel.h"
#include "kernels/relayout.h"

namespace onebit {
namespace int8 {
namespace {

constexpr int64_t kPixelBlock = 32;         // im2col rows a thread builds and multiplies at a time
constexpr int64_t kOutBlock = 256;          // pixels a thread claims: an NCHW output's runs per channel
constexpr int64_t kSerialMacs = 1 << 20;    // smaller layers stay on the calling thread
constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: (v + it) - it rounds |v| < 2^22 half to even

// q[i] = clamp(round_half_even(fl(x[i] * s)), -127, 127) (the clamp first: round is monotone and
// fixes +-127; the rounding by the float adder); returns nonzero when some x[i] * s is NaN.
inline int quantize_run(const float* __restrict x, int64_t count, float s, int8_t* __restrict q) {
  int nan = 0;
  for (int64_t i = 0; i < count; ++i) {  // vectorized: the clamps are max / min instructions
    float t = x[i] * s;
    nan |= t != t;
    t = -127.0f > t ? -127.0f : t;
    t = 127.0f < t ? 127.0f : t;
    q[i] = static_cast<int8_t>(static_cast<int32_t>((t + kRoundShift) - kRoundShift));
  }
  return nan;
}

// x_int as [N, H, W, C] int8; false when x holds a NaN. An NCHW row is transposed to channels_last
// floats first (the ISA's TransposeBlock), then quantized in one run.
inline bool quantize_input(const Int8Conv& c, const float* x, int8_t* q, int threads) {
  const int64_t H = c.H, W = c.W, C = c.C, rows = c.N * H;
  const int64_t xs_n = c.xs_n, xs_c = c.xs_c, xs_h = c.xs_h, xs_w = c.xs_w;
  const float s = c.divisor;
  std::unique_ptr<char[]> finite(new char[static_cast<size_t>(rows)]);
  if (rows * W * C < (1 << 16)) threads = 1;
  const TransposeBlock kernel = isa_kernels(active_isa()).transpose_block;
  const TransposeBlock transpose = kernel ? kernel : transpose_block_reference;
  parallel_chunks(threads, static_cast<int>(rows), [&](int r) {
    const int64_t n = r / H, h = r % H;
    const float* xr = x + n * xs_n + h * xs_h;
    int8_t* qr = q + (n * H + h) * W * C;
    int nan = 0;
    if (xs_c == 1 && xs_w == C) {
      nan = quantize_run(xr, W * C, s, qr);
    } else if (xs_w == 1) {
      std::unique_ptr<float[]> row(new float[static_cast<size_t>(W * C)]);
      transpose(reinterpret_cast<const uint32_t*>(xr), C, W, xs_c, reinterpret_cast<uint32_t*>(row.get()), C);
      nan = quantize_run(row.get(), W * C, s, qr);
    } else {
      for (int64_t w = 0; w < W; ++w)
        for (int64_t ch = 0; ch < C; ++ch) nan |= quantize_run(xr + w * xs_w + ch * xs_c, 1, s, qr + w * C + ch);
    }
    finite[r] = nan == 0;
  });
  for (int64_t r = 0; r < rows; ++r)
    if (!finite[r]) return false;
  return true;
}

// dst[0, n) = src[0, n) by fixed-size moves (overlapping at the end) up to 32 bytes: im2col's runs are
// short (a 7x7 stem's 21 bytes), where a call to memcpy costs more than the copy.
inline void copy_run(int8_t* __restrict dst, const int8_t* __restrict src, int64_t n) {
  if (n > 32) {
    std::memcpy(dst, src, static_cast<size_t>(n));
  } else if (n >= 16) {  // two moves, no call (a loop of them compiles to a call to memcpy)
    std::memcpy(dst, src, 16);
    std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 8) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n >= 4) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
  }
}

// im2col rows of pixels [p0, p0 + count) of group g: taps as (kh, kw, c), zero padding and tail.
inline void im2col(const Int8Conv& c, const int8_t* q, int64_t g, int64_t p0, int64_t count, int64_t row_bytes,
                   int8_t* a) {
  const int64_t Cg = c.C / c.G, OH = c.OH(), OW = c.OW();
  const bool run = c.G == 1 && c.dw == 1;
  int64_t n = p0 / (OH * OW), oh = p0 / OW % OH, ow = p0 % OW;  // then stepped: no divisions per pixel
  for (int64_t i = 0; i < count; ++i, ow = ow + 1 < OW ? ow + 1 : (oh = oh + 1 < OH ? oh + 1 : (++n, 0), 0)) {
    int8_t* row = a + i * row_bytes;
    int64_t k = 0;
    for (int64_t kh = 0; kh < c.KH; ++kh) {
      const int64_t ih = oh * c.sh - c.ph + kh * c.dh;
      const int64_t iw0 = ow * c.sw - c.pw;
      if (run && ih >= 0 && ih < c.H && iw0 >= 0 && iw0 + c.KW <= c.W) {  // the row's taps are one run of q
        copy_run(row + k, q + ((n * c.H + ih) * c.W + iw0) * c.C, c.KW * c.C);
        k += c.KW * c.C;
        continue;
      }
      for (int64_t kw = 0; kw < c.KW; ++kw, k += Cg) {
        const int64_t iw = iw0 + kw * c.dw;
        if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W)
          std::memset(row + k, 0, static_cast<size_t>(Cg));
        else
          copy_run(row + k, q + ((n * c.H + ih) * c.W + iw) * c.C + g * Cg, Cg);
      }
    }
    for (int64_t j = k; j < row_bytes; ++j) row[j] = 0;  // at most 3 bytes
  }
}

// y[o] = fl(fl(fl(float(acc[o]) / s) * scale[o]) + bias[o]) for o < count (scale when S, bias when B), then
// the BatchNorm fl(y * bn_scale[o] + bn_shift[o]): BN 0 none, 1 rounded twice, 2 once (std::fma).
template <bool S, bool B, int BN>
void epilogue_row(const int32_t* acc, int64_t count, float s, const Int8Epilogue& e, int64_t o0, float* y) {
  const float* scale = S ? e.scale + o0 : nullptr;
  const float* bias = B ? e.bias + o0 : nullptr;
  const float* bn_scale = BN ? e.bn_scale + o0 : nullptr;
  const float* bn_shift = BN ? e.bn_shift + o0 : nullptr;
  for (int64_t o = 0; o < count; ++o) {
    float v = static_cast<float>(acc[o]) / s;  // exact int -> float: |acc| < 2^24
    if (S) v = v * scale[o];
    if (B) v = v + bias[o];
    if (BN == 1) v = v * bn_scale[o] + bn_shift[o];  // -ffp-contract=off: two roundings
    if (BN == 2) v = std::fma(v, bn_scale[o], bn_shift[o]);
    y[o] = v;
  }
}

using EpilogueRow = void (*)(const int32_t*, int64_t, float, const Int8Epilogue&, int64_t, float*);

template <int BN>
EpilogueRow epilogue_with(const Int8Epilogue& e) {
  if (e.scale) return e.bias ? epilogue_row<true, true, BN> : epilogue_row<true, false, BN>;
  return e.bias ? epilogue_row<false, true, BN> : epilogue_row<false, false, BN>;
}

inline EpilogueRow epilogue_for(const Int8Epilogue& e) {
  if (!e.bn_scale) return epilogue_with<0>(e);
  return e.bn_fma ? epilogue_with<2>(e) : epilogue_with<1>(e);
}

inline void max_into(int32_t* __restrict m, const int32_t* __restrict v, int64_t n) {
  for (int64_t o = 0; o < n; ++o) m[o] = m[o] > v[o] ? m[o] : v[o];
}

// m = max(a, b) (no memcpy call for a short copy: a == b copies)
inline void max_of(int32_t* __restrict m, const int32_t* a, const int32_t* b, int64_t n) {
  for (int64_t o = 0; o < n; ++o) m[o] = a[o] > b[o] ? a[o] : b[o];
}

// The first and last of a window's taps start + k d (k < K) that lie in [0, size) (one does: max_pool2d's
// padding is at most half its window).
inline void window_taps(int64_t start, int64_t K, int64_t d, int64_t size, int64_t& first, int64_t& last) {
  first = start, last = start + (K - 1) * d;
  while (first < 0) first += d;
  while (last >= size) last -= d;
}

inline void times_sign(int32_t* __restrict v, const int32_t* __restrict sign, int64_t n) {
  for (int64_t o = 0; o < n; ++o) v[o] *= sign[o];
}

// The conv with a max pool of its sums (epi.pool), by bands of pooled rows: a thread computes each
// conv row its band's windows reach once (in a ring of the window's rows: only a band's first window
// computes rows another band computes too), pools each channel's sums (the max of sign * acc, times
// sign: the sums of a ring row are multiplied by their sign once, where any is -1), and runs the float
// epilogue on the pooled pixels only.
template <Gemm gemm, int kScale>
void run_pooled(const Int8Conv& c, const int8_t* q, const int8_t* w, const int32_t* wsum, const Int8Epilogue& epi,
                float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  const Int8Pool& pool = *epi.pool;
  const int64_t Cg = c.C / c.G, OH = c.OH(), OW = c.OW(), Og = c.O / c.G;
  const int64_t POH = Int8Pool::out_size(OH, pool.KH, pool.sh, pool.ph, pool.dh, pool.ceil_mode);
  const int64_t POW = Int8Pool::out_size(OW, pool.KW, pool.sw, pool.pw, pool.dw, pool.ceil_mode);
  const int64_t taps = c.KH * c.KW * Cg, quads = (taps + kTapGroup - 1) / kTapGroup;
  const int64_t blocks = (Og + kChannelBlock - 1) / kChannelBlock;
  const int64_t row_bytes = quads * kTapGroup, width = blocks * kChannelBlock;
  const int64_t block_bytes = quads * kChannelBlock * kTapGroup;
  const int64_t ring = (pool.KH - 1) * pool.dh + 1;  // conv rows a window spans
  const int64_t bands_total = c.N * POH;
  if (c.N * OH * OW * c.O * taps < kSerialMacs) threads = 1;
  const int bands = static_cast<int>(std::min<int64_t>(bands_total, threads > 1 ? 2 * threads : 1));
  const EpilogueRow epilogue = epilogue_for(epi);
  const bool nchw = os_c != 1;
  const TransposeBlock kernel = isa_kernels(active_isa()).transpose_block;
  const TransposeBlock transpose = kernel ? kernel : transpose_block_reference;
  parallel_chunks(threads, bands, [&](int band) {
    const int64_t u0 = bands_total * band / bands, u1 = bands_total * (band + 1) / bands;
    std::unique_ptr<int8_t[]> a(new int8_t[static_cast<size_t>(kPixelBlock * row_bytes)]);
    std::unique_ptr<int32_t[]> rows(new int32_t[static_cast<size_t>(ring * OW * width)]);
    std::unique_ptr<int32_t[]> columns(new int32_t[static_cast<size_t>(OW * width)]);
    std::unique_ptr<int32_t[]> pooled(new int32_t[static_cast<size_t>(POW * Og)]);
    std::unique_ptr<float[]> y(new float[static_cast<size_t>(nchw ? POW * Og : 1)]);
    for (int64_t g = 0; g < c.G; ++g) {
      const int32_t* sign = pool.sign + g * Og;
      const bool negated = std::any_of(sign, sign + Og, [](int32_t v) { return v < 0; });
      int64_t image = -1, next = 0;  // conv rows [.., next) of image are in the ring
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t n = u / POH, pr = u % POH;
        if (n != image) image = n, next = 0;
        const int64_t start = pr * pool.sh - pool.ph;  // the window's rows: start + k dh (those in [0, OH))
        int64_t first, last;
        window_taps(start, pool.KH, pool.dh, OH, first, last);
        // the conv rows from the window's start on not yet computed (the next windows start no lower)
        for (int64_t r = std::max(next, std::max<int64_t>(start, 0)); r <= last; ++r) {
          int32_t* slot = rows.get() + (r % ring) * OW * width;
          for (int64_t x0 = 0; x0 < OW; x0 += kPixelBlock) {
            const int64_t count = std::min(kPixelBlock, OW - x0);
            im2col(c, q, g, (n * OH + r) * OW + x0, count, row_bytes, a.get());
            gemm(a.get(), row_bytes, count, quads, w + g * blocks * block_bytes * kScale, wsum + g * width, blocks,
                 slot + x0 * width, width);
          }
          if (negated)  // sign * acc, so that the pool is a max (|acc| < 2^24)
            for (int64_t p = 0; p < OW; ++p) times_sign(slot + p * width, sign, Og);
        }
        next = std::max(next, last + 1);
        // the window's rows' max at every conv column, then each pooled pixel's max over its columns
        const int64_t row_ints = OW * width;
        const int32_t* top = rows.get() + (first % ring) * row_ints;
        const int32_t* second = first + pool.dh <= last ? rows.get() + ((first + pool.dh) % ring) * row_ints : top;
        max_of(columns.get(), top, second, row_ints);
        for (int64_t r = first + 2 * pool.dh; r <= last; r += pool.dh)
          max_into(columns.get(), rows.get() + (r % ring) * row_ints, row_ints);
        for (int64_t pc = 0; pc < POW; ++pc) {
          int32_t* m = pooled.get() + pc * Og;
          int64_t col, end_col;
          window_taps(pc * pool.sw - pool.pw, pool.KW, pool.dw, OW, col, end_col);
          const int32_t* left = columns.get() + col * width;
          max_of(m, left, col + pool.dw <= end_col ? left + pool.dw * width : left, Og);
          for (col += 2 * pool.dw; col <= end_col; col += pool.dw) max_into(m, columns.get() + col * width, Og);
          if (negated) times_sign(m, sign, Og);
          float* dst = nchw ? y.get() + pc * Og : out + n * os_n + (pr * POW + pc) * os_p + g * Og;
          epilogue(m, Og, c.divisor, epi, g * Og, dst);
        }
        if (nchw)  // the pooled row's [POW, Og] into each channel's plane
          transpose(reinterpret_cast<const uint32_t*>(y.get()), POW, Og, Og,
                    reinterpret_cast<uint32_t*>(out + n * os_n + g * Og * os_c + pr * POW), os_c);
      }
    }
  });
}

// A kernel's form of the weight panels, made once per call before the threads start: kScale bytes a
// panel byte (AVX2: int16 pairs); null: the GEMM reads the panels themselves.
using PreparePanels = void (*)(const int8_t* panels, int64_t bytes, int8_t* out);

template <Gemm gemm, PreparePanels prepare = nullptr, int kScale = 1>
bool run_conv(const Int8Conv& c, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
              float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  std::unique_ptr<int8_t[]> q(new int8_t[static_cast<size_t>(c.N * c.H * c.W * c.C)]);
  if (!quantize_input(c, x, q.get(), threads)) return false;
  const int8_t* w = panels;
  std::unique_ptr<int8_t[]> prepared;
  if (prepare) {
    const int64_t bytes = int8_panel_bytes(c.O, c.C / c.G, c.KH, c.KW, c.G);
    prepared.reset(new int8_t[static_cast<size_t>(bytes * kScale)]);
    prepare(panels, bytes, prepared.get());
    w = prepared.get();
  }
  if (epi.pool) {
    run_pooled<gemm, kScale>(c, q.get(), w, wsum, epi, out, os_n, os_c, os_p, threads);
    return true;
  }
  const int64_t Cg = c.C / c.G, OH = c.OH(), OW = c.OW(), pixels = c.N * OH * OW, Og = c.O / c.G;
  const int64_t taps = c.KH * c.KW * Cg, quads = (taps + kTapGroup - 1) / kTapGroup;
  const int64_t blocks = (Og + kChannelBlock - 1) / kChannelBlock;
  const int64_t row_bytes = quads * kTapGroup, width = blocks * kChannelBlock;
  const int64_t block_bytes = quads * kChannelBlock * kTapGroup;
  const int64_t chunks = (pixels + kOutBlock - 1) / kOutBlock;
  if (pixels * c.O * taps < kSerialMacs) threads = 1;
  const EpilogueRow epilogue = epilogue_for(epi);
  const bool nchw = os_c != 1;  // then os_p == 1 (int8_conv2d's contract)
  const TransposeBlock kernel = isa_kernels(active_isa()).transpose_block;
  const TransposeBlock transpose = kernel ? kernel : transpose_block_reference;
  parallel_chunks(threads, static_cast<int>(chunks), [&](int chunk) {
    const int64_t c0 = chunk * kOutBlock, ccount = std::min(kOutBlock, pixels - c0);
    std::unique_ptr<int8_t[]> a(new int8_t[static_cast<size_t>(kPixelBlock * row_bytes)]);
    std::unique_ptr<int32_t[]> acc(new int32_t[static_cast<size_t>(kPixelBlock * width)]);
    std::unique_ptr<float[]> rows(new float[static_cast<size_t>(nchw ? kOutBlock * Og : 1)]);
    std::unique_ptr<int64_t[]> base(new int64_t[static_cast<size_t>(ccount)]);  // each pixel's output offset
    for (int64_t i = 0; i < ccount; ++i) base[i] = (c0 + i) / (OH * OW) * os_n + (c0 + i) % (OH * OW) * os_p;
    for (int64_t g = 0; g < c.G; ++g) {
      for (int64_t p0 = c0; p0 < c0 + ccount; p0 += kPixelBlock) {
        const int64_t count = std::min(kPixelBlock, c0 + ccount - p0);
        im2col(c, q.get(), g, p0, count, row_bytes, a.get());
        gemm(a.get(), row_bytes, count, quads, w + g * blocks * block_bytes * kScale, wsum + g * width, blocks,
             acc.get(), width);
        for (int64_t i = 0; i < count; ++i)  // channels_last: straight into the output; NCHW: into rows
          epilogue(acc.get() + i * width, Og, c.divisor, epi, g * Og,
                   nchw ? rows.get() + (p0 - c0 + i) * Og : out + base[p0 - c0 + i] + g * Og);
      }
      if (!nchw) continue;
      for (int64_t i0 = 0; i0 < ccount;) {  // NCHW: the rows of each image's run of pixels transposed
        const int64_t n = (c0 + i0) / (OH * OW);
        const int64_t run = std::min(ccount - i0, (n + 1) * OH * OW - (c0 + i0));
        transpose(reinterpret_cast<const uint32_t*>(rows.get() + i0 * Og), run, Og, Og,
                  reinterpret_cast<uint32_t*>(out + base[i0] + g * Og * os_c), os_c);
        i0 += run;
      }
    }
  });
  return true;
}

}  // namespace
}  // namespace int8
}  // namespace onebit
