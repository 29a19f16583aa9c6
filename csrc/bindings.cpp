// Python bindings of onebit's kernels (module onebit._C).
//
// Arrays cross as nanobind ndarrays (DLPack), without copies. Shapes and
// dtypes are validated here, so a kernel never sees an inconsistent call;
// kernels run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <memory>
#include <new>
#include <stdexcept>
#include <string>

#include "kernels/bitplanes.h"
#include "kernels/channel_affine.h"
#include "kernels/conv.h"
#include "kernels/conv_tiles.h"
#include "kernels/huge_pages.h"
#include "kernels/int8_conv.h"
#include "kernels/isa.h"
#include "kernels/pack.h"
#include "kernels/pool_bits.h"
#include "kernels/ordered_conv.h"
#include "kernels/pool_float.h"
#include "kernels/relayout.h"
#include "kernels/rms_norm.h"
#include "kernels/ternary_linear.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using FloatMatrix = nb::ndarray<const float, nb::ndim<2>, nb::device::cpu>;
using WordMatrix = nb::ndarray<int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void pack_rows(FloatMatrix x, WordMatrix out) {
  const int64_t rows = static_cast<int64_t>(x.shape(0));
  const int64_t channels = static_cast<int64_t>(x.shape(1));
  require(channels == 0 || x.stride(1) == 1 || rows == 0,
          "pack_rows: channels must be contiguous (stride 1), got stride " + std::to_string(x.stride(1)));
  require(static_cast<int64_t>(out.shape(0)) == rows && static_cast<int64_t>(out.shape(1)) == onebit::words_for(channels),
          "pack_rows: out must have shape [" + std::to_string(rows) + ", " +
              std::to_string(onebit::words_for(channels)) + "]");
  const float* src = x.data();
  const int64_t row_stride = x.stride(0);
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data());
  nb::gil_scoped_release release;
  onebit::pack_rows(src, rows, channels, row_stride, dst);
}

// The layer kernels take raw addresses and sizes: converting torch tensors to
// nanobind ndarrays (DLPack) costs ~2.5 us per array, a sizable part of a small
// layer. onebit.engine.kernels, the only intended caller, derives every address
// and size from checked, contiguous torch tensors; the numbers are re-validated
// here before any memory is touched.
template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void pack_activations_raw(uintptr_t x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                          int64_t sW, int64_t ph, int64_t pw, int pad_value, int64_t groups, uintptr_t out,
                          int threads) {
  require(x != 0 && out != 0, "pack_activations: null tensor");
  nb::gil_scoped_release release;
  onebit::pack_activations(ptr<const float>(x), N, C, H, W, sN, sC, sH, sW, ph, pw, pad_value, groups,
                           ptr<uint64_t>(out), threads);
}

bool pack_integer_planes_raw(uintptr_t x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC,
                             int64_t sH, int64_t sW, int64_t ph, int64_t pw, int64_t groups, bool symmetric, int bits,
                             float clip, uintptr_t out, int threads) {
  require(x != 0 && out != 0, "pack_integer_planes: null tensor");
  nb::gil_scoped_release release;
  return onebit::pack_integer_planes(ptr<const float>(x), N, C, H, W, sN, sC, sH, sW, ph, pw, groups, symmetric, bits, clip,
                              ptr<uint64_t>(out), threads);
}

void combine_planes_raw(uintptr_t y, int64_t pixels, int64_t Pa, int64_t G, int64_t Pw, int64_t Cog, uintptr_t coeff,
                        uintptr_t offset, int32_t exact_divisor, float divisor, uintptr_t scale, uintptr_t bias,
                        uintptr_t out, int threads) {
  require(y != 0 && coeff != 0 && out != 0 && exact_divisor > 0, "combine_planes: null tensor or divisor");
  nb::gil_scoped_release release;
  onebit::combine_planes(ptr<const int32_t>(y), pixels, Pa, G, Pw, Cog, ptr<const int32_t>(coeff),
                         ptr<const int32_t>(offset), exact_divisor, divisor, ptr<const float>(scale),
                         ptr<const float>(bias), ptr<float>(out), threads);
}

void max_pool_bits_raw(uintptr_t x, uintptr_t or_mask, uintptr_t pad, uintptr_t out, int64_t N, int64_t H, int64_t W,
                       int64_t G, int64_t Wg, int64_t Cg, int64_t OH, int64_t OW, int64_t KH, int64_t KW, int64_t SH, int64_t SW,
                       int64_t PH, int64_t PW, int64_t DH, int64_t DW, int64_t OPH, int64_t OPW) {
  require(x != 0 && or_mask != 0 && pad != 0 && out != 0, "max_pool_bits: null tensor");
  require(N >= 0 && H > 0 && W > 0 && G > 0 && Wg > 0 && OH > 0 && OW > 0, "max_pool_bits: empty or negative shape");
  require(Cg > 0 && Cg <= 64 * Wg && (Cg + 63) / 64 == Wg, "max_pool_bits: channels per group do not fill Wg words");
  require(KH > 0 && KW > 0 && SH > 0 && SW > 0 && DH > 0 && DW > 0 && PH >= 0 && PW >= 0 && OPH >= 0 && OPW >= 0,
          "max_pool_bits: kernel, stride and dilation must be positive, paddings not negative");
  // every output pixel's window starts inside the padded input
  require((OH - 1) * SH - PH < H && (OW - 1) * SW - PW < W, "max_pool_bits: output larger than the input allows");
  const onebit::PoolBitsGeometry g{N, H, W, G, Wg, Cg, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, OPH, OPW};
  nb::gil_scoped_release release;
  onebit::max_pool_bits(ptr<const uint64_t>(x), ptr<const uint64_t>(or_mask), ptr<const uint64_t>(pad), ptr<uint64_t>(out),
                        g);
}

// out [N, cols, rows] (contiguous) = each sample's [rows, cols] plane of x transposed: float32
// NCHW <-> channels_last. The numbers bound what is read (x) and written (out).
void relayout_raw(uintptr_t x, int64_t N, int64_t rows, int64_t cols, int64_t sample_stride, int64_t row_stride,
                  uintptr_t out, int threads) {
  require(x != 0 && out != 0, "relayout: null tensor");
  require(N >= 0 && rows >= 0 && cols >= 0 && sample_stride >= 0 && row_stride >= 0, "relayout: negative shape");
  nb::gil_scoped_release release;
  onebit::transpose_planes(ptr<const uint32_t>(x), N, rows, cols, sample_stride, row_stride, ptr<uint32_t>(out),
                           threads);
}

// out [N, OH, OW, C] (channels_last) = torch's max pool of float32 x [N, C, H, W] with element strides
// (sN, sC, sH, sW): channels_last (sC == 1) or NCHW rows (sW == 1); with bn_scale and bn_shift ([C]), of the
// BatchNorm y = x * bn_scale + bn_shift (kernels/pool_float.h: PoolEpilogue). Python checks the numbers
// (geometry.py).
void max_pool2d_raw(uintptr_t x, uintptr_t out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                    int64_t KH, int64_t KW, int64_t SH, int64_t SW, int64_t PH, int64_t PW, int64_t DH, int64_t DW,
                    int64_t sN, int64_t sC, int64_t sH, int64_t sW, int threads, uintptr_t bn_scale, uintptr_t bn_shift,
                    bool bn_fma) {
  require(x != 0 && out != 0, "max_pool2d: null tensor");
  require(N >= 0 && C >= 0 && H > 0 && W > 0 && OH >= 0 && OW >= 0, "max_pool2d: negative or empty shape");
  require(KH > 0 && KW > 0 && SH > 0 && SW > 0 && DH > 0 && DW > 0 && PH >= 0 && PW >= 0 && PH <= KH / 2 && PW <= KW / 2,
          "max_pool2d: kernel, stride and dilation must be positive, paddings at most half the window");
  require(sC == 1 || sW == 1, "max_pool2d: x must be channels_last or have contiguous rows");
  require((OH - 1) * SH - PH < H && (OW - 1) * SW - PW < W, "max_pool2d: output larger than the input allows");
  require((bn_scale == 0) == (bn_shift == 0), "max_pool2d: bn_scale and bn_shift go together");
  const onebit::MaxPoolGeometry g{N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, sN, sC, sH, sW};
  const onebit::PoolEpilogue bn{ptr<const float>(bn_scale), ptr<const float>(bn_shift), bn_fma};
  nb::gil_scoped_release release;
  onebit::max_pool2d_float(ptr<const float>(x), ptr<float>(out), g, threads, bn_scale ? &bn : nullptr);
}

void ordered_conv1x1_raw(uintptr_t x, int64_t N, int64_t C, int64_t HW, uintptr_t wt, int64_t ld, int64_t Co,
                         uintptr_t bias, uintptr_t out, int threads) {
  require(x != 0 && wt != 0 && out != 0, "ordered_conv1x1: null tensor");
  require(N >= 0 && C > 0 && HW > 0 && Co > 0, "ordered_conv1x1: empty or negative shape");
  require(ld >= Co && ld % onebit::kOrderedConvBlock == 0,
          "ordered_conv1x1: the transposed weight's rows must hold out_channels rounded up to a multiple of " +
              std::to_string(onebit::kOrderedConvBlock));
  nb::gil_scoped_release release;
  onebit::ordered_conv1x1(ptr<const float>(x), N, C, HW, ptr<const float>(wt), ld, Co, ptr<const float>(bias),
                          ptr<float>(out), threads);
}

void channel_affine_raw(uintptr_t x, int64_t N, int64_t C, int64_t HW, bool channels_last, uintptr_t w, uintptr_t b,
                        bool fma, uintptr_t out, int threads) {
  require(x != 0 && w != 0 && out != 0, "channelwise_conv1x1: null tensor");
  require(N >= 0 && C > 0 && HW >= 0, "channelwise_conv1x1: empty or negative shape");
  const onebit::ChannelAffine a{ptr<const float>(x), ptr<float>(out), ptr<const float>(w), ptr<const float>(b),
                                C, HW, channels_last, fma};
  nb::gil_scoped_release release;
  onebit::channel_affine(a, N, threads);
}

void tap_ordered_conv_raw(uintptr_t x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                          int64_t sW, uintptr_t wt, int64_t ld, int64_t Co, int64_t KH, int64_t KW, int64_t SH, int64_t SW,
                          int64_t PH, int64_t PW, uintptr_t out, int threads) {
  require(x != 0 && wt != 0 && out != 0, "tap_ordered_conv: null tensor");
  require(N >= 0 && C > 0 && H > 0 && W > 0 && Co > 0, "tap_ordered_conv: empty or negative shape");
  require(KH > 0 && KW > 0 && SH > 0 && SW > 0 && PH >= 0 && PW >= 0 && KH <= H + 2 * PH && KW <= W + 2 * PW,
          "tap_ordered_conv: kernel and stride must be positive, padding not negative, the kernel inside the padded input");
  require(ld >= Co && ld % onebit::kTapConvBlock == 0,
          "tap_ordered_conv: the weight's rows must hold out_channels rounded up to a multiple of " +
              std::to_string(onebit::kTapConvBlock));
  const onebit::TapConvGeometry g{N,  C,  H,  W,  sN, sC, sH, sW, Co, KH, KW, SH, SW, PH, PW,
                                  (H + 2 * PH - KH) / SH + 1, (W + 2 * PW - KW) / SW + 1};
  nb::gil_scoped_release release;
  onebit::tap_ordered_conv(ptr<const float>(x), ptr<const float>(wt), ld, ptr<float>(out), g, threads);
}

// Builds a validated plan from the numbers of a call (see onebit/engine/kernels.py).
onebit::ConvPlan* make_plan(int64_t N, int64_t Hp, int64_t Wp, int64_t x_words_per_pixel, int64_t w_words, int64_t C,
                            int64_t Co, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                            int64_t dh, int64_t dw, int64_t groups, int pad_value, int mode, int64_t oph, int64_t opw,
                            int64_t out_groups, int out_pad_value) {
  require(mode >= 0 && mode <= 2, "binary_conv2d: mode must be 0 (int32), 1 (float32) or 2 (threshold)");
  require(groups > 0 && C > 0, "binary_conv2d: in_channels and groups must be >= 1");
  onebit::ConvGeometry g;
  g.N = N;
  g.Hp = Hp;
  g.Wp = Wp;
  g.C = C;
  g.Co = Co;
  g.G = groups;
  g.Wg = onebit::words_for(C / groups);
  g.KH = KH;
  g.KW = KW;
  g.sh = sh;
  g.sw = sw;
  g.ph = ph;
  g.pw = pw;
  g.dh = dh;
  g.dw = dw;
  g.pad_value = pad_value;
  onebit::ConvOutput o;
  o.mode = static_cast<onebit::OutMode>(mode);
  o.oph = oph;
  o.opw = opw;
  o.OG = out_groups;
  o.out_pad_value = out_pad_value;
  return new onebit::ConvPlan(g, o, x_words_per_pixel, w_words);
}

// A BatchNorm epilogue: per-channel scale and shift, rounded as one fused multiply-add or two.
struct BatchNormPtrs {
  uintptr_t scale = 0, shift = 0;
  bool fused = false;
};

onebit::ConvOutput plan_output(const onebit::ConvPlan& plan, uintptr_t out, uintptr_t scale, uintptr_t bias,
                               uintptr_t thr, uintptr_t dir, uintptr_t residual, const BatchNormPtrs& bn = {}) {
  onebit::ConvOutput o;
  switch (plan.params().mode) {
    case onebit::OutMode::int32: o.out_i32 = ptr<int32_t>(out); break;
    case onebit::OutMode::float32: o.out_f32 = ptr<float>(out); break;
    case onebit::OutMode::threshold: o.out_bits = ptr<uint64_t>(out); break;
  }
  o.scale = ptr<const float>(scale);
  o.bias = ptr<const float>(bias);
  require(residual == 0 || plan.params().mode == onebit::OutMode::float32,
          "binary_conv2d: a residual needs the float32 output");
  o.residual = ptr<const float>(residual);
  require((bn.scale == 0) == (bn.shift == 0), "binary_conv2d: a BatchNorm needs both its scale and its shift");
  require(bn.scale == 0 || plan.params().mode == onebit::OutMode::float32,
          "binary_conv2d: a BatchNorm needs the float32 output");
  o.bn_scale = ptr<const float>(bn.scale);
  o.bn_shift = ptr<const float>(bn.shift);
  o.bn_fma = bn.fused;
  o.thr = ptr<const int32_t>(thr);
  o.dir = ptr<const int8_t>(dir);
  // Direction values are checked (with the GIL held) before the long part runs.
  if (plan.params().mode == onebit::OutMode::threshold && o.dir)
    for (int64_t c = 0; c < plan.geometry().Co; ++c)
      if (o.dir[c] != 1 && o.dir[c] != -1)
        throw std::invalid_argument("binary_conv2d: direction[" + std::to_string(c) + "] = " +
                                    std::to_string(o.dir[c]) + ", expected +1 or -1");
  return o;
}

void run_plan(const onebit::ConvPlan& plan, uintptr_t x, uintptr_t w, uintptr_t out, uintptr_t scale, uintptr_t bias,
              uintptr_t thr, uintptr_t dir, int threads, onebit::WeightCache* cache, int64_t w_version,
              uintptr_t residual, uintptr_t bn_scale, uintptr_t bn_shift, bool bn_fma, bool out_nchw,
              bool residual_nchw) {
  onebit::ConvOutput o = plan_output(plan, out, scale, bias, thr, dir, residual, {bn_scale, bn_shift, bn_fma});
  require(!out_nchw || plan.params().mode == onebit::OutMode::float32, "binary_conv2d: an NCHW output is float32");
  o.out_nchw = out_nchw;
  o.residual_nchw = residual_nchw;
  nb::gil_scoped_release release;
  plan.run(ptr<const uint64_t>(x), ptr<const uint64_t>(w), o, threads, cache, w_version);
}

// The plan run on a float32 [N, C, H, W] input (element strides), packed on the fly.
void run_plan_float(const onebit::ConvPlan& plan, uintptr_t x, int64_t sN, int64_t sC, int64_t sH, int64_t sW,
                    uintptr_t w, uintptr_t out, uintptr_t scale, uintptr_t bias, uintptr_t thr, uintptr_t dir,
                    int threads, onebit::WeightCache* cache, int64_t w_version, uintptr_t residual,
                    uintptr_t bn_scale, uintptr_t bn_shift, bool bn_fma, bool out_nchw, bool residual_nchw) {
  onebit::ConvOutput o = plan_output(plan, out, scale, bias, thr, dir, residual, {bn_scale, bn_shift, bn_fma});
  require(!out_nchw || plan.params().mode == onebit::OutMode::float32, "binary_conv2d: an NCHW output is float32");
  o.out_nchw = out_nchw;
  o.residual_nchw = residual_nchw;
  nb::gil_scoped_release release;
  plan.run(ptr<const float>(x), sN, sC, sH, sW, ptr<const uint64_t>(w), o, threads, cache, w_version);
}

void conv2d_raw(uintptr_t x, int64_t N, int64_t Hp, int64_t Wp, int64_t x_words_per_pixel, uintptr_t w,
                int64_t w_words, int64_t C, int64_t Co, int64_t KH, int64_t KW, int64_t sh, int64_t sw, int64_t ph,
                int64_t pw, int64_t dh, int64_t dw, int64_t groups, int pad_value, int mode, uintptr_t out,
                uintptr_t scale, uintptr_t bias, uintptr_t thr, uintptr_t dir, int64_t oph, int64_t opw,
                int64_t out_groups, int out_pad_value, int threads) {
  std::unique_ptr<onebit::ConvPlan> plan(make_plan(N, Hp, Wp, x_words_per_pixel, w_words, C, Co, KH, KW, sh, sw, ph,
                                                   pw, dh, dw, groups, pad_value, mode, oph, opw, out_groups,
                                                   out_pad_value));
  run_plan(*plan, x, w, out, scale, bias, thr, dir, threads, nullptr, 0, 0, 0, 0, false, false, false);
}

void require_norm_lanes(int lanes) {
  require(lanes == 0 || lanes == 4 || lanes == 8 || lanes == 16, "rms_norm: lanes must be 4, 8 or 16 (0: no norm)");
}

void ternary_linear_raw(uintptr_t x, int64_t N, int64_t K, int64_t x_stride, uintptr_t w, int64_t O, uintptr_t scale,
                        uintptr_t bias, uintptr_t out, int threads, int norm_lanes, double norm_eps) {
  require(x != 0 && w != 0 && out != 0, "ternary_linear: null tensor");
  require(N >= 0 && K > 0 && O > 0 && x_stride >= K, "ternary_linear: bad shape");
  require(K <= (int64_t{1} << 17), "ternary_linear: in_features must be <= 131072 (exact float32 accumulators)");
  require_norm_lanes(norm_lanes);
  nb::gil_scoped_release release;
  onebit::ternary_linear(ptr<const float>(x), N, K, x_stride, ptr<const uint8_t>(w), O, ptr<const float>(scale),
                         ptr<const float>(bias), ptr<float>(out), threads, norm_lanes, static_cast<float>(norm_eps));
}

void rms_norm_raw(uintptr_t x, int64_t N, int64_t K, int64_t x_stride, double eps, int lanes, uintptr_t out) {
  require(x != 0 && out != 0, "rms_norm: null tensor");
  require(N >= 0 && K > 0 && x_stride >= K, "rms_norm: bad shape");
  require(lanes != 0, "rms_norm: lanes must be 4, 8 or 16");
  require_norm_lanes(lanes);
  nb::gil_scoped_release release;
  // the active ISA's copy, the one a packed BitLinear's call runs (so a probe asks about that code)
  onebit::rms_norm_rows(ptr<const float>(x), N, K, x_stride, static_cast<float>(eps), lanes, ptr<float>(out));
}

void ternary_linear_int_raw(uintptr_t x, int64_t N, int64_t K, uintptr_t w, int64_t O, uintptr_t out, int threads) {
  require(x != 0 && w != 0 && out != 0, "ternary_linear_int: null tensor");
  require(N >= 0 && K > 0 && O > 0, "ternary_linear_int: bad shape");
  require(K <= (int64_t{1} << 23), "ternary_linear_int: in_features must be <= 2^23 (int32 accumulators)");
  nb::gil_scoped_release release;
  onebit::ternary_linear_int(ptr<const int8_t>(x), N, K, ptr<const uint8_t>(w), O, ptr<int32_t>(out), threads);
}

// geometry: N, C, H, W, x strides (n, c, h, w), O, KH, KW, sh, sw, ph, pw, dh, dw, G; out strides (n, c, pixel).
// panels and wsum: int8_make_panels' output for this conv's weights (int8_panels_raw).
bool int8_conv2d_raw(uintptr_t x, std::vector<int64_t> geometry, float divisor, uintptr_t panels, uintptr_t wsum,
                     uintptr_t scale, uintptr_t bias, uintptr_t bn_scale, uintptr_t bn_shift, bool bn_fma, uintptr_t out,
                     std::vector<int64_t> out_strides, int threads, std::vector<int64_t> pool, uintptr_t pool_sign) {
  require(x != 0 && panels != 0 && wsum != 0 && out != 0, "int8_conv2d: null tensor");
  require(geometry.size() == 18 && out_strides.size() == 3, "int8_conv2d: bad geometry");
  const int64_t* g = geometry.data();
  const onebit::Int8Conv conv{g[0],  g[1],  g[2],  g[3],  g[4],  g[5],  g[6],  g[7],  g[8],     g[9],
                              g[10], g[11], g[12], g[13], g[14], g[15], g[16], g[17], divisor};
  require(conv.N >= 0 && conv.C > 0 && conv.H > 0 && conv.W > 0 && conv.O > 0 && conv.KH > 0 && conv.KW > 0 &&
              conv.sh > 0 && conv.sw > 0 && conv.ph >= 0 && conv.pw >= 0 && conv.dh > 0 && conv.dw > 0 &&
              conv.G > 0 && conv.C % conv.G == 0 && conv.O % conv.G == 0 && conv.OH() > 0 && conv.OW() > 0,
          "int8_conv2d: bad shape");
  require(conv.C / conv.G * conv.KH * conv.KW * 127 * 127 < (int64_t{1} << 24),
          "int8_conv2d: taps x 127^2 must be < 2^24 (exact float32 sums)");
  require(divisor > 0.0f, "int8_conv2d: the divisor must be positive");
  require(out_strides[1] == 1 || out_strides[2] == 1, "int8_conv2d: the output's channels or pixels must be contiguous");
  nb::gil_scoped_release release;
  require((bn_scale == 0) == (bn_shift == 0), "int8_conv2d: bn_scale and bn_shift go together");
  onebit::Int8Epilogue epi;
  epi.scale = ptr<const float>(scale);
  epi.bias = ptr<const float>(bias);
  epi.bn_scale = ptr<const float>(bn_scale);
  epi.bn_shift = ptr<const float>(bn_shift);
  epi.bn_fma = bn_fma;
  onebit::Int8Pool max_pool{};
  if (!pool.empty()) {  // kernel, stride, padding, dilation (each h, w), ceil_mode
    require(pool.size() == 9 && pool_sign != 0, "int8_conv2d: bad pool");
    const int64_t* p = pool.data();
    max_pool = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8] != 0, ptr<const int32_t>(pool_sign)};
    require(p[0] > 0 && p[1] > 0 && p[2] > 0 && p[3] > 0 && p[6] > 0 && p[7] > 0 && p[4] >= 0 && p[5] >= 0 &&
                2 * p[4] <= p[0] && 2 * p[5] <= p[1],
            "int8_conv2d: bad pool (padding must be at most half the kernel)");
    require(onebit::Int8Pool::out_size(conv.OH(), p[0], p[2], p[4], p[6], p[8] != 0) > 0 &&
                onebit::Int8Pool::out_size(conv.OW(), p[1], p[3], p[5], p[7], p[8] != 0) > 0,
            "int8_conv2d: the pool's window is larger than the conv's output");
    epi.pool = &max_pool;
  }
  return onebit::int8_conv2d(conv, ptr<const float>(x), ptr<const int8_t>(panels), ptr<const int32_t>(wsum), epi,
                             ptr<float>(out), out_strides[0], out_strides[1], out_strides[2], threads);
}

void int8_panels_raw(uintptr_t w, int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G, uintptr_t panels,
                     uintptr_t wsum) {
  require(w != 0 && panels != 0 && wsum != 0, "int8_panels: null tensor");
  require(O > 0 && Cg > 0 && KH > 0 && KW > 0 && G > 0 && O % G == 0, "int8_panels: bad shape");
  nb::gil_scoped_release release;
  onebit::int8_make_panels(ptr<const int8_t>(w), O, Cg, KH, KW, G, ptr<int8_t>(panels), ptr<int32_t>(wsum));
}

// A uint8 torch tensor of nbytes in memory from huge_page_alloc (released with the tensor), and whether
// its whole 2 MiB pages were advised as huge pages.
std::tuple<nb::ndarray<nb::pytorch, uint8_t, nb::ndim<1>>, bool> huge_page_buffer(int64_t nbytes) {
  require(nbytes > 0, "huge_page_buffer: nbytes must be positive, got " + std::to_string(nbytes));
  const onebit::HugePageBuffer b = onebit::huge_page_alloc(nbytes);
  if (b.data == nullptr) throw std::bad_alloc();
  auto* held = new onebit::HugePageBuffer(b);
  nb::capsule owner(held, [](void* p) noexcept {
    auto* buffer = static_cast<onebit::HugePageBuffer*>(p);
    onebit::huge_page_free(*buffer);
    delete buffer;
  });
  const size_t shape[1] = {static_cast<size_t>(nbytes)};
  return {nb::ndarray<nb::pytorch, uint8_t, nb::ndim<1>>(static_cast<uint8_t*>(b.data), 1, shape, owner), b.advised};
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "onebit's native kernels (bit-packing and binary layers).";
  m.def("isa", [] { return std::string(onebit::isa_name(onebit::active_isa())); },
        "The instruction set the kernels use now: avx512, avx2, neon_dotprod, neon, scalar or reference.");
  m.def("set_isa", &onebit::set_isa, "name"_a,
        "Force the kernels onto one instruction set (avx512, avx2, neon_dotprod, neon, scalar, reference).");
  m.def("supported_isas", &onebit::supported_isas, "Instruction sets this CPU can run, fastest first.");
  m.def("has_avx512_vnni", &onebit::has_avx512_vnni, "Whether this CPU has AVX-512 VNNI (used on the avx512 ISA).");
  m.def("ternary_linear_kernel", [] { return std::string(onebit::ternary_linear_kernel()); },
        "The ternary x int8 kernel the active ISA runs: avx512_vnni, avx2, neon_dotprod, neon or reference.");
  m.def("int8_conv_kernel", [] { return std::string(onebit::int8_conv_kernel()); },
        "The int8 x int8 conv kernel the active ISA runs: avx512_vnni, avx2 or reference.");
  m.def("int8_panel_sizes",
        [](int64_t O, int64_t Cg, int64_t KH, int64_t KW, int64_t G) {
          return std::make_tuple(onebit::int8_panel_bytes(O, Cg, KH, KW, G), onebit::int8_panel_sums(O, G));
        },
        "O"_a, "Cg"_a, "KH"_a, "KW"_a, "G"_a, "(int8 bytes, int32 sums) of an int8 conv's weight panels.");
  m.def("int8_panels_raw", &int8_panels_raw, "w"_a, "O"_a, "Cg"_a, "KH"_a, "KW"_a, "G"_a, "panels"_a, "wsum"_a,
        "Low level (addresses): an int8 conv's weight panels and channel sums. Use onebit.engine.kernels.int8.");
  m.def("int8_conv2d_raw", &int8_conv2d_raw, "x"_a, "geometry"_a, "divisor"_a, "panels"_a, "wsum"_a, "scale"_a,
        "bias"_a, "bn_scale"_a, "bn_shift"_a, "bn_fma"_a, "out"_a, "out_strides"_a, "threads"_a,
        "pool"_a = std::vector<int64_t>(), "pool_sign"_a = uintptr_t{0},
        "Low level (addresses): the int8 x int8 conv (kernels/int8_conv.h), then a max pool of its sums when "
        "pool (kernel, stride, padding, dilation, ceil_mode) is given; False when x holds a NaN. "
        "Use onebit.engine.kernels.int8.");
  m.def("ternary_linear_raw", &ternary_linear_raw, "x"_a, "N"_a, "K"_a, "x_stride"_a, "w"_a, "O"_a, "scale"_a,
        "bias"_a, "out"_a, "threads"_a, "norm_lanes"_a = 0, "norm_eps"_a = 0.0,
        "Low level (addresses): float32 [N, O] of float32 tokens [N, K] (RMS-normalized in torch's order when "
        "norm_lanes > 0, absmax8-quantized inside) and 2-bit ternary weights [O, ceil(K/4)] uint8. Use "
        "onebit.engine.kernels.ternary_linear or TernaryLayer.");
  m.def("rms_norm_raw", &rms_norm_raw, "x"_a, "N"_a, "K"_a, "x_stride"_a, "eps"_a, "lanes"_a, "out"_a,
        "Low level (addresses): float32 [N, K] = F.rms_norm of float32 [N, K] (row stride x_stride) without "
        "weight, summed in torch's cascade order with `lanes`-wide vectors. Use onebit.engine.kernels.rms_norm.");
  m.def("ternary_linear_int_raw", &ternary_linear_int_raw, "x"_a, "N"_a, "K"_a, "w"_a, "O"_a, "out"_a, "threads"_a,
        "Low level (addresses): int32 [N, O] of int8 [N, K] and 2-bit ternary weights [O, ceil(K/4)] uint8. "
        "Use onebit.engine.kernels.ternary_linear_int.");
  m.def("huge_page_buffer", &huge_page_buffer, "nbytes"_a,
        "(uint8 tensor of nbytes, advised): memory aligned to 2 MiB whose whole 2 MiB pages are advised as "
        "transparent huge pages (Linux). Use onebit.engine.kernels.in_huge_pages.");
  onebit::init_tiles_from_env();  // a bad ONEBIT_TILE fails the import, naming the valid tiles
  m.def("tiles", &onebit::tile_names, "isa"_a,
        "The convolution's register tiles for an ISA (pixels x channels), the default first.");
  m.def("set_tile", &onebit::set_tile, "isa"_a, "name"_a,
        "Force the convolution's register tile for an ISA (a name from tiles(isa)); 'auto' restores the choice "
        "by timing each tile on each layer shape at its first run.");
  m.def("tile", &onebit::forced_tile, "isa"_a, "The tile forced for an ISA, or 'auto'.");
  m.def("tile_choices", &onebit::tile_choices,
        "The tiles chosen by timing so far, as (isa, layer shape, tile) tuples.");
  m.def("pack_rows", &pack_rows, "x"_a, "out"_a,
        "Pack a float32 [rows, channels] matrix into int64 [rows, ceil(channels/64)] words: bit set = x < 0.");
  m.def("pack_activations_raw", &pack_activations_raw, "x"_a, "N"_a, "C"_a, "H"_a, "W"_a, "sN"_a, "sC"_a, "sH"_a,
        "sW"_a, "ph"_a, "pw"_a, "pad_value"_a, "groups"_a, "out"_a, "threads"_a,
        "Low level (addresses): pack float [N, C, H, W] (element strides) into int64 [N, H+2ph, W+2pw, G, Wg]. "
        "Use onebit.engine.kernels.pack_activations.");
  m.def("pack_integer_planes_raw", &pack_integer_planes_raw, "x"_a, "N"_a, "C"_a, "H"_a, "W"_a, "sN"_a, "sC"_a,
        "sH"_a, "sW"_a, "ph"_a, "pw"_a, "groups"_a, "symmetric"_a, "bits"_a, "clip"_a, "out"_a, "threads"_a,
        "Low level (addresses): k-bit activation levels of float [N, C, H, W] as packed +-1 bit planes "
        "[N, H+2ph, W+2pw, P*G, Wg]; returns whether x holds a NaN. Use onebit.engine.kernels.pack_integer_planes.");
  m.def("combine_planes_raw", &combine_planes_raw, "y"_a, "pixels"_a, "Pa"_a, "G"_a, "Pw"_a, "Cog"_a, "coeff"_a,
        "offset"_a, "exact_divisor"_a, "divisor"_a, "scale"_a, "bias"_a, "out"_a, "threads"_a,
        "Low level (addresses): the weighted sum of a stacked bit-plane conv's plane pairs, then / divisor * scale "
        "+ bias. Use onebit.engine.kernels.combine_planes.");
  m.def("max_pool_bits_raw", &max_pool_bits_raw, "x"_a, "or_mask"_a, "pad"_a, "out"_a, "N"_a, "H"_a, "W"_a, "G"_a,
        "Wg"_a, "Cg"_a, "OH"_a, "OW"_a, "KH"_a, "KW"_a, "SH"_a, "SW"_a, "PH"_a, "PW"_a, "DH"_a, "DW"_a, "OPH"_a, "OPW"_a,
        "Low level (addresses): max pooling of thresholded bits [N, H, W, G, Wg] into [N, OH+2OPH, OW+2OPW, G, Wg]. "
        "Use onebit.engine.kernels.max_pool_bits.");
  m.def("ordered_conv1x1_raw", &ordered_conv1x1_raw, "x"_a, "N"_a, "C"_a, "HW"_a, "wt"_a, "ld"_a, "Co"_a, "bias"_a,
        "out"_a, "threads"_a,
        "Low level (addresses): a float32 1x1 conv of x [N, C, HW] summed in channel order, each product and sum "
        "rounded (see ordered_conv.h), into out [N, Co, HW]. Use onebit.engine.kernels.ordered_conv.");
  m.def("channel_affine_raw", &channel_affine_raw, "x"_a, "N"_a, "C"_a, "HW"_a, "channels_last"_a, "w"_a, "b"_a,
        "fma"_a, "out"_a, "threads"_a,
        "Low level (addresses): a depthwise 1x1 float32 conv of x [N, C, HW] (or [N, HW, C] channels_last), "
        "x * w[c] + b[c] rounded twice or once (fma; see channel_affine.h), into out of x's layout. Use "
        "onebit.engine.kernels.ChannelwiseConv1x1.");
  m.def("tap_ordered_conv_raw", &tap_ordered_conv_raw, "x"_a, "N"_a, "C"_a, "H"_a, "W"_a, "sN"_a, "sC"_a, "sH"_a,
        "sW"_a, "wt"_a, "ld"_a, "Co"_a, "KH"_a, "KW"_a, "SH"_a, "SW"_a, "PH"_a, "PW"_a, "out"_a, "threads"_a,
        "Low level (addresses): a float32 conv of x (element strides) summed as one fused multiply-add chain per "
        "output in (kh, kw, c) order (see ordered_conv.h), into channels_last out. Use "
        "onebit.engine.kernels.TapOrderedConv.");
  m.def("max_pool2d_raw", &max_pool2d_raw, "x"_a, "out"_a, "N"_a, "C"_a, "H"_a, "W"_a, "OH"_a, "OW"_a, "KH"_a, "KW"_a,
        "SH"_a, "SW"_a, "PH"_a, "PW"_a, "DH"_a, "DW"_a, "sN"_a, "sC"_a, "sH"_a, "sW"_a, "threads"_a,
        "bn_scale"_a = uintptr_t{0}, "bn_shift"_a = uintptr_t{0}, "bn_fma"_a = false,
        "Low level (addresses): torch's max pool of float32 x (element strides) into channels_last out; with "
        "bn_scale and bn_shift, of the BatchNorm x * bn_scale + bn_shift (pooled first: see pool_float.h). "
        "Use onebit.engine.kernels.max_pool2d.");
  m.def("relayout_raw", &relayout_raw, "x"_a, "N"_a, "rows"_a, "cols"_a, "sample_stride"_a, "row_stride"_a, "out"_a,
        "threads"_a,
        "Low level (addresses): out [N, cols, rows] = each sample's [rows, cols] plane of 32-bit x (element "
        "strides) transposed; float32 NCHW <-> channels_last. Use onebit.engine.kernels.relayout.");
  nb::class_<onebit::ConvPlan>(m, "ConvPlan",
                                "A validated binary convolution of one shape; run() it on packed tensors.")
      .def_prop_ro("out_height", [](const onebit::ConvPlan& p) { return p.geometry().OH; })
      .def_prop_ro("out_width", [](const onebit::ConvPlan& p) { return p.geometry().OW; })
      .def_prop_ro(
          "tile", [](const onebit::ConvPlan& p) { return p.tile(static_cast<int>(onebit::active_isa())); },
          "The register tile this plan runs with on the active ISA ('' before its first run there).")
      .def_prop_ro(
          "nchw_kernel", [](const onebit::ConvPlan& p) { return p.nchw_kernel(static_cast<int>(onebit::active_isa())); },
          "The kernel writing this plan's float32 output in NCHW memory itself on the active ISA (no residual or "
          "an NCHW one), or '' where the tile's channels_last runs are transposed into place.")
      .def("run", &run_plan, "x"_a, "w"_a, "out"_a, "scale"_a, "bias"_a, "thr"_a, "dir"_a, "threads"_a,
           "cache"_a.none() = nb::none(), "w_version"_a = 0, "residual"_a = 0, "bn_scale"_a = 0, "bn_shift"_a = 0,
           "bn_fma"_a = false, "out_nchw"_a = false, "residual_nchw"_a = false,
           "Low level (addresses): run on packed input x, packed weights w into out (a float32 out in NCHW "
           "memory with out_nchw; a residual in NCHW memory with residual_nchw).")
      .def("run_float", &run_plan_float, "x"_a, "sN"_a, "sC"_a, "sH"_a, "sW"_a, "w"_a, "out"_a, "scale"_a, "bias"_a,
           "thr"_a, "dir"_a, "threads"_a, "cache"_a.none() = nb::none(), "w_version"_a = 0, "residual"_a = 0,
           "bn_scale"_a = 0, "bn_shift"_a = 0, "bn_fma"_a = false, "out_nchw"_a = false, "residual_nchw"_a = false,
           "Low level (addresses): pack the float32 [N, C, H, W] input x (element strides) and run, in one pass.");
  nb::class_<onebit::WeightCache>(m, "WeightCache",
                                  "One layer's weights prepared for the kernels, kept between calls (see conv.h).")
      .def(nb::init<>())
      .def_prop_ro("entries", &onebit::WeightCache::entries)
      .def_ro_static("PROBE_WORDS", &onebit::WeightCache::kProbeWords);
  m.def("conv_plan", &make_plan, "N"_a, "Hp"_a, "Wp"_a, "x_words_per_pixel"_a, "w_words"_a, "C"_a, "Co"_a, "KH"_a,
        "KW"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a, "groups"_a, "pad_value"_a, "mode"_a, "oph"_a, "opw"_a,
        "out_groups"_a, "out_pad_value"_a, nb::rv_policy::take_ownership,
        "Validate a binary convolution's numbers and precompute its shape-only data.");
  m.def("conv2d_raw", &conv2d_raw, "x"_a, "N"_a, "Hp"_a, "Wp"_a, "x_words_per_pixel"_a, "w"_a, "w_words"_a, "C"_a,
        "Co"_a, "KH"_a, "KW"_a, "sh"_a, "sw"_a, "ph"_a, "pw"_a, "dh"_a, "dw"_a, "groups"_a, "pad_value"_a, "mode"_a,
        "out"_a, "scale"_a, "bias"_a, "thr"_a, "dir"_a, "oph"_a, "opw"_a, "out_groups"_a, "out_pad_value"_a,
        "threads"_a,
        "Low level (addresses): binary convolution of packed operands. Use onebit.engine.kernels.binary_conv2d.");
}
