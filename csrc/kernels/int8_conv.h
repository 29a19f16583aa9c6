// int8 x int8 convolution and linear layers, exact in integers (onebit.engine.graph.int8).
//
// The input x (float32 [N, C, H, W], any strides) is quantized as the int8 quantizer does it:
//   x_int = clamp(round_half_even(fl(x * s)), -127, 127),
// the weights are int8 levels [O, C / G, KH, KW] in -127 .. 127, zero padding is applied to x_int, and
//   acc[n, o, p] = sum over (c, kh, kw) of x_int * w        (an exact int32: |acc| <= taps * 127^2)
//   out          = fl(fl(fl(float(acc) / s) * scale[o]) + bias[o])   (no fused multiply-add),
// which is the simulated layer's float32 arithmetic bit for bit while taps * 127^2 < 2^24.
//
// The kernels multiply a block of im2col rows (one row a pixel: its taps as (kh, kw, c) in groups of
// four bytes, zero beyond the taps) by weight panels: per group, per block of 16 output channels, per
// four taps, 16 channels x 4 int8 (64 bytes). AVX-512 VNNI (vpdpbusd) takes x + 128 as unsigned bytes
// and starts each sum at -128 * sum(w), AVX2 widens both operands to int16 pairs (vpmaddwd), so
// every partial sum is an exact int32 on every ISA.
#pragma once
#include <cstdint>

namespace onebit {
namespace int8 {

constexpr int kChannelBlock = 16;  // output channels a panel holds
constexpr int kTapGroup = 4;       // taps a panel row holds per channel

// acc[p * acc_stride + o] for pixels p < pixels and output channels o < 16 * blocks: im2col rows a
// (row p at a + p * a_stride, quads * 4 bytes) times panels w ([blocks][quads][16][4]);
// wsum[o] = the sum of channel o's weights (the VNNI kernel's offset correction).
using Gemm = void (*)(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
                      const int32_t* wsum, int64_t blocks, int32_t* acc, int64_t acc_stride);

void gemm_reference(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
                    const int32_t* wsum, int64_t blocks, int32_t* acc, int64_t acc_stride);
// (w: the panels widened to int16 pairs, twice their bytes; conv_avx2 widens them once per call)
void gemm_avx2(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* wsum, int64_t blocks, int32_t* acc, int64_t acc_stride);
void gemm_vnni(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* wsum, int64_t blocks, int32_t* acc, int64_t acc_stride);

}  // namespace int8

struct Int8Conv;

// A max pool over the conv's int32 sums, before the float epilogue: torch's max_pool2d of the epilogue's
// floats, exactly, where the epilogue e is monotone in each channel's sum (the caller checks it): then
// max pool(e(acc)) = e(max acc) where e is non-decreasing (sign +1) and e(min acc) where it is
// non-increasing (sign -1). Windows as max_pool2d's: padding excluded, ceil_mode's last window kept
// only where it starts inside the input or its left padding.
struct Int8Pool {
  int64_t KH, KW, sh, sw, ph, pw, dh, dw;
  bool ceil_mode;
  const int32_t* sign;  // [O]: +1 or -1
  static int64_t out_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
    const int64_t span = size + 2 * p - d * (k - 1) - 1;
    int64_t out = (span + (ceil_mode ? s - 1 : 0)) / s + 1;
    if (ceil_mode && (out - 1) * s >= size + p) --out;
    return out;
  }
};

// The float epilogue's per-channel operands (each [O] or null): out = fl(fl(fl(acc / s) * scale) + bias),
// then a BatchNorm's fl(out * bn_scale + bn_shift), rounded once (bn_fma) or twice, when bn_scale is set;
// with pool set, of the pooled sums (the output is the pool's).
struct Int8Epilogue {
  const float* scale = nullptr;
  const float* bias = nullptr;
  const float* bn_scale = nullptr;
  const float* bn_shift = nullptr;
  bool bn_fma = false;
  const Int8Pool* pool = nullptr;
};

namespace int8 {

// The whole conv (int8_conv2d's arguments) with one GEMM kernel, each compiled for its ISA.
using ConvRun = bool (*)(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum,
                         const Int8Epilogue& epi, float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads);
bool conv_reference(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum,
                    const Int8Epilogue& epi, float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads);
bool conv_avx2(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads);
bool conv_vnni(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads);

}  // namespace int8

struct Int8Conv {
  int64_t N, C, H, W;          // input
  int64_t xs_n, xs_c, xs_h, xs_w;  // input strides, in elements
  int64_t O, KH, KW, sh, sw, ph, pw, dh, dw, G;
  float divisor;               // s
  int64_t OH() const { return (H + 2 * ph - dh * (KH - 1) - 1) / sh + 1; }
  int64_t OW() const { return (W + 2 * pw - dw * (KW - 1) - 1) / sw + 1; }
};

// The sizes of the weight panels of a conv: int8 bytes [G][blocks][quads][16][4] and int32 sums [G][blocks * 16].
int64_t int8_panel_bytes(int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G);
int64_t int8_panel_sums(int64_t O, int64_t G);

// The panels and the channels' weight sums of int8 weights [O, C / G, KH, KW] (made once per weight).
void int8_make_panels(const int8_t* w, int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G, int8_t* panels,
                      int32_t* wsum);

// out[n * os_n + o * os_c + p * os_p] (p = oh * OW + ow; os_c == 1 or os_p == 1) of x and the weights' panels,
// through the epilogue (OH x OW the pool's output with epi.pool). False (nothing written) when x holds a NaN.
bool int8_conv2d(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum,
                 const Int8Epilogue& epi, float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads);

// The name of the kernel the active ISA runs: "avx512_vnni", "avx2" or "reference".
const char* int8_conv_kernel();

}  // namespace onebit
