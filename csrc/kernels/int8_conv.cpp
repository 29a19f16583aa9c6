// The int8 x int8 conv / linear: the weight panels and the run-time choice of kernel (the driver
// itself is int8_conv_driver.h, compiled in each ISA's file; see int8_conv.h).
#include "kernels/int8_conv.h"

#include <cstring>

#include "kernels/dispatch.h"
#include "kernels/isa.h"

namespace onebit {
namespace {

struct PanelShape {
  int64_t taps, quads, blocks, block_bytes;
};

PanelShape panel_shape(int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G) {
  PanelShape p;
  p.taps = KH * KW * Cg;
  p.quads = (p.taps + int8::kTapGroup - 1) / int8::kTapGroup;
  p.blocks = (O / G + int8::kChannelBlock - 1) / int8::kChannelBlock;
  p.block_bytes = p.quads * int8::kChannelBlock * int8::kTapGroup;
  return p;
}

int8::ConvRun conv_kernel() {
  const int8::ConvRun kernel = isa_kernels(active_isa()).int8_conv;
  return kernel ? kernel : int8::conv_reference;
}

}  // namespace

const char* int8_conv_kernel() {
#if ONEBIT_X86
  const int8::ConvRun kernel = conv_kernel();
  if (kernel == int8::conv_vnni) return "avx512_vnni";
  if (kernel == int8::conv_avx2) return "avx2";
#endif
  return "reference";
}

int64_t int8_panel_bytes(int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G) {
  return G * panel_shape(O, Cg, KH, KW, G).blocks * panel_shape(O, Cg, KH, KW, G).block_bytes;
}

int64_t int8_panel_sums(int64_t O, int64_t G) { return G * panel_shape(O, 1, 1, 1, G).blocks * int8::kChannelBlock; }

void int8_make_panels(const int8_t* w, int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G, int8_t* panels,
                      int32_t* wsum) {
  const PanelShape p = panel_shape(O, Cg, KH, KW, G);
  const int64_t Og = O / G, kk = KH * KW;
  std::memset(panels, 0, static_cast<size_t>(G * p.blocks * p.block_bytes));
  std::memset(wsum, 0, static_cast<size_t>(G * p.blocks * int8::kChannelBlock) * sizeof(int32_t));
  for (int64_t g = 0; g < G; ++g)
    for (int64_t o = 0; o < Og; ++o) {
      const int64_t b = o / int8::kChannelBlock, lane = o % int8::kChannelBlock;
      int8_t* block = panels + (g * p.blocks + b) * p.block_bytes;
      for (int64_t t = 0; t < kk; ++t)
        for (int64_t ch = 0; ch < Cg; ++ch) {
          const int8_t v = w[((g * Og + o) * Cg + ch) * kk + t];
          const int64_t k = t * Cg + ch;  // im2col order: (kh, kw, c)
          block[((k / int8::kTapGroup) * int8::kChannelBlock + lane) * int8::kTapGroup + k % int8::kTapGroup] = v;
          wsum[g * p.blocks * int8::kChannelBlock + o] += v;
        }
    }
}

bool int8_conv2d(const Int8Conv& c, const float* x, const int8_t* w, const int32_t* wsum, const Int8Epilogue& epi,
                 float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return conv_kernel()(c, x, w, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace onebit
