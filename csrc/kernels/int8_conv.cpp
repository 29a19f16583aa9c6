// The int8 x int8 conv / linear driver: quantization, im2col rows, the run-time choice of kernel,
// threads over pixel blocks, the float epilogue (see int8_conv.h).
#include "kernels/int8_conv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/parallel.h"

namespace onebit {
namespace {

constexpr int64_t kPixelBlock = 32;       // im2col rows a thread builds and multiplies at a time
constexpr int64_t kSerialMacs = 1 << 20;  // smaller layers stay on the calling thread
constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: (v + it) - it rounds |v| < 2^22 half to even

int8::Gemm gemm_kernel() {
  const int8::Gemm kernel = isa_kernels(active_isa()).int8_gemm;
  return kernel ? kernel : int8::gemm_reference;
}

// clamp(round_half_even(fl(v * s)), -127, 127): the clamp first (round is monotone and fixes +-127),
// then the rounding by the float adder; false for NaN.
inline int8_t quantize(float v, float s, bool& finite) {
  float t = v * s;
  finite &= t == t;
  t = t < -127.0f ? -127.0f : (t > 127.0f ? 127.0f : t);
  const float r = (t + kRoundShift) - kRoundShift;
  return static_cast<int8_t>(static_cast<int>(r));
}

// x_int as [N, H, W, C] int8; false when x holds a NaN.
bool quantize_input(const Int8Conv& c, const float* x, int8_t* q, int threads) {
  const int64_t rows = c.N * c.H;
  std::vector<char> finite(static_cast<size_t>(rows), 1);
  if (rows * c.W * c.C < (1 << 16)) threads = 1;
  parallel_chunks(threads, static_cast<int>(rows), [&](int r) {
    const int64_t n = r / c.H, h = r % c.H;
    const float* xr = x + n * c.xs_n + h * c.xs_h;
    int8_t* qr = q + (n * c.H + h) * c.W * c.C;
    bool ok = true;
    if (c.xs_c == 1) {
      for (int64_t w = 0; w < c.W; ++w)
        for (int64_t ch = 0; ch < c.C; ++ch) qr[w * c.C + ch] = quantize(xr[w * c.xs_w + ch], c.divisor, ok);
    } else {
      for (int64_t ch = 0; ch < c.C; ++ch)
        for (int64_t w = 0; w < c.W; ++w) qr[w * c.C + ch] = quantize(xr[ch * c.xs_c + w * c.xs_w], c.divisor, ok);
    }
    finite[r] = ok;
  });
  return std::all_of(finite.begin(), finite.end(), [](char ok) { return ok != 0; });
}

// The weight panels of every group ([G][blocks][quads][16][4]) and the channels' weight sums.
struct Panels {
  int64_t taps, quads, blocks;
  std::vector<int8_t> w;
  std::vector<int32_t> wsum;  // [G][blocks * 16]
};

Panels make_panels(const Int8Conv& c, const int8_t* w) {
  const int64_t Cg = c.C / c.G, Og = c.O / c.G, kk = c.KH * c.KW;
  Panels p;
  p.taps = kk * Cg;
  p.quads = (p.taps + int8::kTapGroup - 1) / int8::kTapGroup;
  p.blocks = (Og + int8::kChannelBlock - 1) / int8::kChannelBlock;
  const int64_t block_bytes = p.quads * int8::kChannelBlock * int8::kTapGroup;
  p.w.assign(static_cast<size_t>(c.G * p.blocks * block_bytes), 0);
  p.wsum.assign(static_cast<size_t>(c.G * p.blocks * int8::kChannelBlock), 0);
  for (int64_t g = 0; g < c.G; ++g)
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t t = 0; t < kk; ++t)
        for (int64_t ch = 0; ch < Cg; ++ch) {
          const int8_t v = w[((g * Og + o) * Cg + ch) * kk + t];
          const int64_t k = t * Cg + ch;  // im2col order: (kh, kw, c)
          const int64_t b = o / int8::kChannelBlock, lane = o % int8::kChannelBlock;
          p.w[static_cast<size_t>((g * p.blocks + b) * block_bytes +
                                  ((k / int8::kTapGroup) * int8::kChannelBlock + lane) * int8::kTapGroup +
                                  k % int8::kTapGroup)] = v;
          p.wsum[static_cast<size_t>(g * p.blocks * int8::kChannelBlock + o)] += v;
        }
  return p;
}

// im2col rows of pixels [p0, p0 + count) of group g: taps as (kh, kw, c), zero padding and tail.
void im2col(const Int8Conv& c, const int8_t* q, int64_t g, int64_t p0, int64_t count, int64_t row_bytes,
            int8_t* a) {
  const int64_t Cg = c.C / c.G, OH = c.OH(), OW = c.OW();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t p = p0 + i, n = p / (OH * OW), oh = p / OW % OH, ow = p % OW;
    int8_t* row = a + i * row_bytes;
    int64_t k = 0;
    for (int64_t kh = 0; kh < c.KH; ++kh) {
      const int64_t ih = oh * c.sh - c.ph + kh * c.dh;
      for (int64_t kw = 0; kw < c.KW; ++kw, k += Cg) {
        const int64_t iw = ow * c.sw - c.pw + kw * c.dw;
        if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W)
          std::memset(row + k, 0, static_cast<size_t>(Cg));
        else
          std::memcpy(row + k, q + ((n * c.H + ih) * c.W + iw) * c.C + g * Cg, static_cast<size_t>(Cg));
      }
    }
    std::memset(row + k, 0, static_cast<size_t>(row_bytes - k));
  }
}

}  // namespace

const char* int8_conv_kernel() {
  const int8::Gemm kernel = gemm_kernel();
#if ONEBIT_X86
  if (kernel == int8::gemm_vnni) return "avx512_vnni";
  if (kernel == int8::gemm_avx2) return "avx2";
#endif
  return "reference";
}

bool int8_conv2d(const Int8Conv& c, const float* x, const int8_t* w, const float* scale, const float* bias,
                 float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  std::vector<int8_t> q(static_cast<size_t>(c.N * c.H * c.W * c.C));
  if (!quantize_input(c, x, q.data(), threads)) return false;
  const Panels panels = make_panels(c, w);
  const int64_t OH = c.OH(), OW = c.OW(), pixels = c.N * OH * OW, Og = c.O / c.G;
  const int64_t row_bytes = panels.quads * int8::kTapGroup;
  const int64_t width = panels.blocks * int8::kChannelBlock;
  const int64_t block_bytes = panels.quads * int8::kChannelBlock * int8::kTapGroup;
  const int8::Gemm gemm = gemm_kernel();
  const int64_t chunks = (pixels + kPixelBlock - 1) / kPixelBlock;
  if (pixels * c.O * panels.taps < kSerialMacs) threads = 1;
  parallel_chunks(threads, static_cast<int>(chunks), [&](int chunk) {
    const int64_t p0 = chunk * kPixelBlock, count = std::min(kPixelBlock, pixels - p0);
    std::vector<int8_t> a(static_cast<size_t>(kPixelBlock * row_bytes));
    std::vector<int32_t> acc(static_cast<size_t>(kPixelBlock * width));
    for (int64_t g = 0; g < c.G; ++g) {
      im2col(c, q.data(), g, p0, count, row_bytes, a.data());
      gemm(a.data(), row_bytes, count, panels.quads, panels.w.data() + g * panels.blocks * block_bytes,
           panels.wsum.data() + g * width, panels.blocks, acc.data(), width);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t p = p0 + i, n = p / (OH * OW), pix = p % (OH * OW);
        float* y = out + n * os_n + pix * os_p;
        const int32_t* ai = acc.data() + i * width;
        for (int64_t o = 0; o < Og; ++o) {
          const int64_t oc = g * Og + o;
          float v = static_cast<float>(ai[o]) / c.divisor;  // exact int -> float: |acc| < 2^24
          if (scale) v = v * scale[oc];
          if (bias) v = v + bias[oc];
          y[oc * os_c] = v;
        }
      }
    }
  });
  return true;
}

}  // namespace onebit
