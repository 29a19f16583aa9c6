// onebit's C++ kernels against independent references, on every ISA this CPU runs and every
// register tile of each, on random shapes: what tests/engine/test_kernels.py checks through
// Python, as one static program that also runs under qemu on ARM (make test-aarch64).
//
//   check_kernels [--seed S] [--count N] [--verbose]
//
// Each of the N cases draws one shape per kernel family from seed S:
//   binary conv: groups, channels (1 to 3 words a group), kernel, stride, dilation, padding 0/+1/-1,
//     int32 / float (scale, bias, BatchNorm rounded once or twice, shortcut) / threshold (out padding,
//     out groups) outputs, packed or float input (packed inside the call), 1 or 2 threads;
//     against plain loops (xor-popcount from the definition, float ops one by one);
//   activation packing (any strides, groups, pad values), row (weight) packing, bit planes (k-bit
//     levels as +-1 planes) and the sum of their plane pairs, ternary x int8 linear (int and float),
//     the float plane transpose, float max pooling, float convs summed in torch's orders, the depthwise
//     1x1 conv (rounded twice or once), int8 convs.
// Every mismatch prints a FAIL line naming the kernel, ISA, tile and shape; the exit status is 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/bitplanes.h"
#include "kernels/conv.h"
#include "kernels/conv_tiles.h"
#include "kernels/int8_conv.h"
#include "kernels/isa.h"
#include "kernels/pack.h"
#include "kernels/ordered_conv.h"
#include "kernels/pool_float.h"
#include "kernels/channel_affine.h"
#include "kernels/relayout.h"
#include "kernels/ternary_linear.h"

#include "check_support.h"

using namespace onebit;
using namespace onebit_check;

namespace {

// ---- binary convolution ------------------------------------------------------------------------

struct ConvCase {
  ConvGeometry g;
  ConvOutput o;  // mode and packed-output parameters
  bool scale = false, bias = false, bn = false, residual = false, fused_input = false, nchw = false;
  bool residual_nchw = false;
  int threads = 1;
  std::string text() const {
    const ConvGeometry& v = g;
    std::string s = "N" + str(v.N) + " C" + str(v.C) + " Co" + str(v.Co) + " G" + str(v.G) + " " + str(v.Hp - 2 * v.ph) +
                    "x" + str(v.Wp - 2 * v.pw) + " k" + str(v.KH) + "x" + str(v.KW) + " s" + str(v.sh) + "x" +
                    str(v.sw) + " p" + str(v.ph) + "x" + str(v.pw) + " d" + str(v.dh) + "x" + str(v.dw) + " pad" +
                    str(v.pad_value) + " threads" + str(threads) + (fused_input ? " float-input" : " packed-input");
    if (o.mode == OutMode::int32) return s + " out=int32";
    if (o.mode == OutMode::threshold)
      return s + " out=threshold op" + str(o.oph) + "x" + str(o.opw) + " OG" + str(o.OG) + " opad" +
             str(o.out_pad_value);
    return s + " out=float" + (scale ? " scale" : "") + (bias ? " bias" : "") +
           (bn ? (o.bn_fma ? " bn(fma)" : " bn(2 roundings)") : "") + (residual ? " shortcut" : "") +
           (nchw ? " NCHW-out" : "") + (residual_nchw ? " NCHW-shortcut" : "");
  }
};

ConvCase draw_conv(Rng& r) {
  ConvCase c;
  ConvGeometry& g = c.g;
  // one case in 8 is large: more than 31 word steps (several byte-count flushes), several channel
  // blocks of every tile, many pixel tiles
  const bool large = r.range(0, 7) == 0;
  g.G = large ? 1 : r.pick({1, 1, 2, 3});
  const int64_t Cg = large ? r.pick({256, 320, 512}) : r.pick({1, 5, 31, 63, 64, 65, 100, 128, 150, 192});
  g.C = Cg * g.G;
  // channels per group: partial blocks of every tile, and multiples of 8 (whole output bytes)
  g.Co = (large ? r.range(33, 80) : r.pick({1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 19, 24, 32})) * g.G;
  g.KH = r.range(1, 3), g.KW = r.range(1, 3);
  g.sh = r.range(1, 2), g.sw = r.range(1, 2);
  g.dh = r.range(1, 2), g.dw = r.range(1, 2);
  g.ph = r.range(0, 2), g.pw = r.range(0, 2);
  g.pad_value = static_cast<int>(r.range(-1, 1));
  g.N = r.range(1, 2);
  const int64_t H = r.range(1, large ? 14 : 9), W = r.range(1, large ? 14 : 9);
  g.Hp = std::max(H + 2 * g.ph, g.dh * (g.KH - 1) + 1);  // the dilated kernel fits the padded input
  g.Wp = std::max(W + 2 * g.pw, g.dw * (g.KW - 1) + 1);
  g.Wg = words_for(Cg);
  const int mode = static_cast<int>(r.range(0, 2));
  c.o.mode = static_cast<OutMode>(mode);
  if (c.o.mode == OutMode::float32) {
    c.scale = r.coin(), c.bias = r.coin(), c.bn = r.coin(), c.residual = r.coin();
    c.o.bn_fma = r.coin();
    c.nchw = r.coin();                          // the output in NCHW memory
    c.residual_nchw = c.residual && r.coin();  // the shortcut in NCHW memory
    if (c.nchw && r.coin()) {  // rows of whole 8-pixel groups, stride 1: the kernels writing NCHW themselves
      g.sh = g.sw = 1;
      g.Wp = r.pick({8, 16}) + g.dw * (g.KW - 1);  // OW + the kernel's reach, a width >= 4 inside the padding
    }
  } else if (c.o.mode == OutMode::threshold) {
    c.o.oph = r.range(0, 1), c.o.opw = r.range(0, 1);
    c.o.out_pad_value = static_cast<int>(r.range(-1, 1));
    c.o.OG = g.Co % 2 == 0 && r.coin() ? 2 : 1;
  }
  c.fused_input = r.coin();
  c.threads = r.coin() ? 2 : 1;
  return c;
}

struct ConvData {
  std::vector<float> x;       // [N, C, H, W] float input
  std::vector<uint64_t> xp;   // packed, padded
  std::vector<uint64_t> wp;   // [Co, KH, KW, Wg]
  std::vector<float> scale, bias, bn_scale, bn_shift, residual;
  std::vector<int32_t> thr;
  std::vector<int8_t> dir;
};

ConvData conv_data(Rng& r, const ConvCase& c) {
  const ConvGeometry& g = c.g;
  const int64_t H = g.Hp - 2 * g.ph, W = g.Wp - 2 * g.pw, Cg = g.C / g.G;
  ConvData d;
  d.x = r.floats(g.N * g.C * H * W);
  d.xp = naive_pack_activations(d.x.data(), g.N, g.C, H, W, g.C * H * W, H * W, W, 1, g.ph, g.pw, g.pad_value, g.G);
  const std::vector<float> w = r.floats(g.Co * g.KH * g.KW * Cg);  // [Co, KH, KW, Cg]
  d.wp = naive_pack_rows(w.data(), g.Co * g.KH * g.KW, Cg, Cg);
  const int64_t outs = g.N * g.Co * ((g.Hp - g.dh * (g.KH - 1) - 1) / g.sh + 1) * ((g.Wp - g.dw * (g.KW - 1) - 1) / g.sw + 1);
  d.scale = r.normals(g.Co), d.bias = r.normals(g.Co), d.bn_scale = r.normals(g.Co), d.bn_shift = r.normals(g.Co);
  d.residual = r.normals(outs);
  const int64_t K = Cg * g.KH * g.KW;
  for (int64_t co = 0; co < g.Co; ++co) {
    d.thr.push_back(static_cast<int32_t>(r.range(-K / 2, K / 2)));
    d.dir.push_back(r.coin() ? 1 : -1);
  }
  return d;
}

// The outputs of the plain-loop definition, or of one kernel run.
struct ConvResult {
  std::vector<int32_t> i32;
  std::vector<float> f32;
  std::vector<uint64_t> bits;
};

ConvOutput conv_pointers(const ConvCase& c, ConvData& d, ConvResult& out, const ConvOutput& shape) {
  ConvOutput o = shape;
  const ConvGeometry& g = c.g;
  const int64_t outs = g.N * g.OH * g.OW * g.Co;
  if (o.mode == OutMode::int32) out.i32.assign(outs, 0x7eadbeef), o.out_i32 = out.i32.data();
  if (o.mode == OutMode::float32) {
    out.f32.assign(outs, -12345.0f), o.out_f32 = out.f32.data();
    if (c.scale) o.scale = d.scale.data();
    if (c.bias) o.bias = d.bias.data();
    if (c.bn) o.bn_scale = d.bn_scale.data(), o.bn_shift = d.bn_shift.data();
    if (c.residual) o.residual = d.residual.data();
  }
  if (o.mode == OutMode::threshold) {
    out.bits.assign(g.N * (g.OH + 2 * o.oph) * (g.OW + 2 * o.opw) * o.OG * o.OWg, 0x5555555555555555ULL);
    o.out_bits = out.bits.data(), o.thr = d.thr.data(), o.dir = d.dir.data();
  }
  return o;
}

// The definition, loop by loop (no tiles, no border classes): padded taps of pad_value 0 skipped.
ConvResult naive_conv(const ConvCase& c, ConvData& d, const ConvOutput& shape) {
  const ConvGeometry& g = c.g;
  ConvResult res;
  const ConvOutput o = conv_pointers(c, d, res, shape);
  if (o.mode == OutMode::threshold) {
    std::fill(res.bits.begin(), res.bits.end(), 0);
    if (o.out_pad_value < 0) fill_packed_border(res.bits.data(), g.N, g.OH, g.OW, o.oph, o.opw, o.OG, o.OCg, -1);
  }
  const int64_t px = g.G * g.Wg;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oh = 0; oh < g.OH; ++oh)
      for (int64_t ow = 0; ow < g.OW; ++ow)
        for (int64_t co = 0; co < g.Co; ++co) {
          const int64_t q = (n * g.OH + oh) * g.OW + ow, grp = co / g.Cog;
          int32_t acc = 0;
          for (int64_t kh = 0; kh < g.KH; ++kh)
            for (int64_t kw = 0; kw < g.KW; ++kw) {
              const int64_t ih = oh * g.sh + kh * g.dh, iw = ow * g.sw + kw * g.dw;
              if (g.pad_value == 0 && (ih < g.ph || ih >= g.Hp - g.ph || iw < g.pw || iw >= g.Wp - g.pw)) continue;
              for (int64_t k = 0; k < g.Wg; ++k) {
                const uint64_t xv = d.xp[((n * g.Hp + ih) * g.Wp + iw) * px + grp * g.Wg + k];
                const uint64_t wv = d.wp[((co * g.KH + kh) * g.KW + kw) * g.Wg + k];
                const int64_t bits = std::min<int64_t>(64, g.Cg - 64 * k);  // +1 per agreeing bit, -1 per other
                const uint64_t real = bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
                acc += static_cast<int32_t>(bits - 2 * __builtin_popcountll((xv ^ wv) & real));
              }
            }
          if (o.mode == OutMode::int32) o.out_i32[q * g.Co + co] = acc;
          if (o.mode == OutMode::float32) {
            float f = static_cast<float>(acc);  // one rounding per operation (-ffp-contract=off)
            if (o.scale) f = f * o.scale[co];
            if (o.bias) f = f + o.bias[co];
            if (o.bn_scale) {
              if (o.bn_fma) {
                f = std::fma(f, o.bn_scale[co], o.bn_shift[co]);
              } else {
                f = f * o.bn_scale[co];
                f = f + o.bn_shift[co];
              }
            }
            if (o.residual) f = f + o.residual[q * g.Co + co];
            o.out_f32[q * g.Co + co] = f;
          }
          if (o.mode == OutMode::threshold && (o.dir[co] > 0 ? acc < o.thr[co] : acc > o.thr[co])) {
            const int64_t pix = (n * (g.OH + 2 * o.oph) + oh + o.oph) * (g.OW + 2 * o.opw) + ow + o.opw;
            const int64_t og = co / o.OCg, b = co % o.OCg;
            o.out_bits[pix * o.OG * o.OWg + og * o.OWg + b / 64] |= uint64_t{1} << (b % 64);
          }
        }
  return res;
}

bool same(const ConvResult& a, const ConvResult& b) {
  return a.i32 == b.i32 && a.bits == b.bits && a.f32.size() == b.f32.size() &&
         (a.f32.empty() || std::memcmp(a.f32.data(), b.f32.data(), a.f32.size() * sizeof(float)) == 0);
}

void check_conv(Rng& r, Report& report) {
  ConvCase c = draw_conv(r);
  ConvData d = conv_data(r, c);
  ConvOutput shape = c.o;
  validate_conv(c.g, shape, c.g.G * c.g.Wg, c.g.Wg);
  ConvResult want = naive_conv(c, d, shape);
  if (c.nchw) {  // [N, OH * OW, Co] -> [N, Co, OH * OW]
    const int64_t hw = c.g.OH * c.g.OW, Co = c.g.Co;
    std::vector<float> planes(want.f32.size());
    for (int64_t n = 0; n < c.g.N; ++n)
      for (int64_t q = 0; q < hw; ++q)
        for (int64_t co = 0; co < Co; ++co) planes[(n * Co + co) * hw + q] = want.f32[(n * hw + q) * Co + co];
    want.f32 = planes;
  }
  shape.out_nchw = c.nchw;
  std::vector<float> shortcut_planes;  // the shortcut [N, Co, OH * OW], for an NCHW-shortcut case
  if (c.residual_nchw) {
    const int64_t hw = c.g.OH * c.g.OW, Co = c.g.Co;
    shortcut_planes.resize(d.residual.size());
    for (int64_t n = 0; n < c.g.N; ++n)
      for (int64_t q = 0; q < hw; ++q)
        for (int64_t co = 0; co < Co; ++co) shortcut_planes[(n * Co + co) * hw + q] = d.residual[(n * hw + q) * Co + co];
  }
  report.trace("binary_conv2d: " + c.text());
  const ConvPlan plan(c.g, shape, c.g.G * c.g.Wg, c.g.Wg);
  const int64_t H = c.g.H, W = c.g.W;
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<std::string> tiles = tile_names(isa);
    if (tiles.empty()) tiles.push_back("");  // the reference ISA: binary_conv2d_reference
    for (const std::string& tile : tiles) {
      if (!tile.empty()) set_tile(isa, tile);
      ConvResult got;
      ConvOutput o = conv_pointers(c, d, got, shape);
      if (c.residual_nchw) o.residual = shortcut_planes.data(), o.residual_nchw = true;
      if (c.fused_input)
        plan.run(d.x.data(), c.g.C * H * W, H * W, W, 1, d.wp.data(), o, c.threads);
      else
        plan.run(d.xp.data(), d.wp.data(), o, c.threads);
      report.check(same(got, want), "binary_conv2d", isa, tile, c.text());
      if (!tile.empty()) set_tile(isa, "auto");
    }
  }
}

// ---- packing, bit planes, ternary linear, relayout --------------------------------------------

void check_pack(Rng& r, Report& report) {
  const int64_t G = r.pick({1, 1, 2, 4}), Cg = r.pick({1, 3, 17, 64, 65, 100, 130}), C = Cg * G;
  const int64_t N = r.range(1, 2), H = r.range(1, 6), W = r.range(1, 11), ph = r.range(0, 2), pw = r.range(0, 2);
  const int pad_value = static_cast<int>(r.range(-1, 1));
  const int layout = static_cast<int>(r.range(0, 2));  // NCHW, channels_last, W outermost (neither)
  std::vector<float> x = r.floats(N * C * H * W);
  int64_t sN = C * H * W, sC = H * W, sH = W, sW = 1;
  if (layout == 1) sC = 1, sW = C, sH = W * C;
  if (layout == 2) sW = N * C * H, sN = C * H, sC = H, sH = 1;
  const std::string text = "N" + str(N) + " C" + str(C) + " G" + str(G) + " " + str(H) + "x" + str(W) + " p" + str(ph) +
                           "x" + str(pw) + " pad" + str(pad_value) + " layout" + str(layout);
  const std::vector<uint64_t> want = naive_pack_activations(x.data(), N, C, H, W, sN, sC, sH, sW, ph, pw, pad_value, G);
  const int64_t rows = r.range(1, 5), channels = r.pick({1, 15, 16, 63, 64, 65, 200}), stride = channels + r.range(0, 3);
  std::vector<float> m = r.floats(rows * stride);
  const std::vector<uint64_t> want_rows = naive_pack_rows(m.data(), rows, channels, stride);
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<uint64_t> got(want.size(), 0xdeadbeefULL);
    pack_activations(x.data(), N, C, H, W, sN, sC, sH, sW, ph, pw, pad_value, G, got.data(), static_cast<int>(r.range(1, 2)));
    report.check(got == want, "pack_activations", isa, "", text);
    std::vector<uint64_t> got_rows(want_rows.size(), 0xdeadbeefULL);
    pack_rows(m.data(), rows, channels, stride, got_rows.data());
    report.check(got_rows == want_rows, "pack_rows (weights)", isa, "",
                 "rows" + str(rows) + " channels" + str(channels) + " stride" + str(stride));
  }
}

void check_planes(Rng& r, Report& report) {
  const int64_t G = r.pick({1, 2}), Cg = r.pick({1, 7, 64, 70}), C = Cg * G;
  const int64_t N = r.range(1, 2), H = r.range(1, 5), W = r.range(1, 9), ph = r.range(0, 1), pw = r.range(0, 1);
  const bool symmetric = r.coin(), channels_last = r.coin();
  const int bits = static_cast<int>(r.range(1, 4));
  const float clip = symmetric ? 0.5f + static_cast<float>(r.range(0, 3)) * 0.25f : 1.0f;
  std::vector<float> x = r.normals(N * C * H * W);
  for (float& v : x) v = v * 0.7f + 0.3f;
  if (r.range(0, 7) == 0) x[r.range(0, static_cast<int64_t>(x.size()) - 1)] = std::numeric_limits<float>::quiet_NaN();
  int64_t sN = C * H * W, sC = H * W, sH = W, sW = 1;
  if (channels_last) sC = 1, sW = C, sH = W * C;
  bool want_nan = false;
  const std::vector<uint64_t> want =
      naive_planes(x.data(), N, C, H, W, sN, sC, sH, sW, ph, pw, G, symmetric, bits, clip, want_nan);
  const std::string text = "N" + str(N) + " C" + str(C) + " G" + str(G) + " " + str(H) + "x" + str(W) + " bits" +
                           str(bits) + (symmetric ? " symmetric" : " unsigned") + (channels_last ? " channels_last" : " NCHW");
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<uint64_t> got(want.size(), 0xdeadbeefULL);
    const bool nan = pack_integer_planes(x.data(), N, C, H, W, sN, sC, sH, sW, ph, pw, G, symmetric, bits, clip,
                                         got.data(), static_cast<int>(r.range(1, 2)));
    report.check(nan == want_nan && (want_nan || got == want), "pack_integer_planes", isa, "", text);
  }
}

// The stacked bit-plane conv's plane pairs summed (bitplanes.h): coefficients and offsets multiples of
// the exact divisor, so that the integer division is exact as the layer's is.
void check_combine(Rng& r, Report& report) {
  const int64_t pixels = r.range(1, 30), Pa = r.range(1, 3), G = r.range(1, 2), Pw = r.range(1, 3), Cog = r.range(1, 20);
  const int32_t exact = static_cast<int32_t>(r.pick({1, 2, 4}));
  const float divisor = static_cast<float>(r.pick({1, 3, 7, 15}));
  const int64_t Co = G * Cog, stacked = Pa * G * Pw * Cog;
  std::vector<int32_t> y(pixels * stacked), coeff(Pa * Pw), offset(Co);
  for (int32_t& v : y) v = static_cast<int32_t>(r.range(-300, 300));
  for (int32_t& v : coeff) v = static_cast<int32_t>(r.range(-4, 4)) * exact;
  for (int32_t& v : offset) v = static_cast<int32_t>(r.range(-50, 50)) * exact;
  const std::vector<float> scale = r.normals(Co), bias = r.normals(Co);
  const bool with_offset = r.coin(), with_scale = r.coin(), with_bias = r.coin();
  std::vector<float> want(pixels * Co);
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < Cog; ++c) {
        int32_t acc = with_offset ? offset[g * Cog + c] : 0;
        for (int64_t i = 0; i < Pa; ++i)
          for (int64_t j = 0; j < Pw; ++j) acc += coeff[i * Pw + j] * y[p * stacked + ((i * G + g) * Pw + j) * Cog + c];
        float v = static_cast<float>(acc / exact) / divisor;
        if (with_scale) v = v * scale[g * Cog + c];
        if (with_bias) v = v + bias[g * Cog + c];
        want[p * Co + g * Cog + c] = v;
      }
  const std::string text = "pixels" + str(pixels) + " Pa" + str(Pa) + " G" + str(G) + " Pw" + str(Pw) + " Cog" + str(Cog) +
                           " exact" + str(exact);
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), -1.0f);
    combine_planes(y.data(), pixels, Pa, G, Pw, Cog, coeff.data(), with_offset ? offset.data() : nullptr, exact, divisor,
                   with_scale ? scale.data() : nullptr, with_bias ? bias.data() : nullptr, got.data(),
                   static_cast<int>(r.range(1, 2)));
    report.check(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0, "combine_planes", isa, "", text);
  }
}

void check_ternary(Rng& r, Report& report) {
  // tokens: one, an odd count, more than a pass of 8 tokens over a row block
  const int64_t N = r.pick({1, 1, 2, 3, 5, 8, 11}), K = r.pick({1, 3, 255, 256, 257, 512, 700, 1024}), O = r.range(1, 70);
  const int64_t row_bytes = ternary_row_bytes(K);
  std::vector<uint8_t> w(O * row_bytes, 0);
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < K; ++k) w[o * row_bytes + k / 4] |= static_cast<uint8_t>(r.range(0, 2) << (2 * (k % 4)));
  std::vector<int8_t> q(N * K);
  for (int8_t& v : q) v = static_cast<int8_t>(r.coin() ? r.range(-128, 127) : r.pick({-128, 127, 0}));
  std::vector<float> x = r.normals(N * K), scale = r.normals(O), bias = r.normals(O);
  if (r.range(0, 5) == 0) x[r.range(0, N * K - 1)] = std::numeric_limits<float>::infinity();
  std::vector<int32_t> want_int;
  std::vector<float> want_float;
  naive_ternary(q.data(), x.data(), N, K, w.data(), O, scale.data(), bias.data(), want_int, want_float);
  const std::string text = "N" + str(N) + " K" + str(K) + " O" + str(O);
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    const int threads = static_cast<int>(r.range(1, 2));
    std::vector<int32_t> got_int(N * O, 0x7eadbeef);
    ternary_linear_int(q.data(), N, K, w.data(), O, got_int.data(), threads);
    report.check(got_int == want_int, "ternary_linear_int", isa, ternary_linear_kernel(), text);
    std::vector<float> got(N * O, -1.0f);
    ternary_linear(x.data(), N, K, K, w.data(), O, scale.data(), bias.data(), got.data(), threads);
    report.check(std::memcmp(got.data(), want_float.data(), got.size() * sizeof(float)) == 0, "ternary_linear", isa,
                 ternary_linear_kernel(), text);
  }
}

void check_relayout(Rng& r, Report& report) {
  const int64_t N = r.range(1, 3), rows = r.range(1, 40), cols = r.range(1, 40), pad = r.range(0, 3);
  const int64_t row_stride = cols + pad, sample_stride = rows * row_stride + r.range(0, 5);
  std::vector<uint32_t> x(N * sample_stride);
  for (uint32_t& v : x) v = static_cast<uint32_t>(r.next());
  std::vector<uint32_t> want(N * rows * cols);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) want[(n * cols + j) * rows + i] = x[n * sample_stride + i * row_stride + j];
  const std::string text = "N" + str(N) + " " + str(rows) + "x" + str(cols) + " row_stride" + str(row_stride);
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<uint32_t> got(want.size(), 0xfeedfaceu);
    transpose_planes(x.data(), N, rows, cols, sample_stride, row_stride, got.data(), static_cast<int>(r.range(1, 2)));
    report.check(got == want, "transpose_planes (relayout)", isa, "", text);
  }
}

// torch's max_pool2d output length (ceil mode keeps the last window starting inside).
int64_t pool_length(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil) {
  const int64_t span = size + 2 * p - d * (k - 1) - 1;
  int64_t out = (span + (ceil ? s - 1 : 0)) / s + 1;
  if (ceil && (out - 1) * s >= size + p) --out;
  return out;
}

// The float max pool (NCHW or channels_last in, channels_last out) against torch's rule as a plain loop:
// per output, the first tap in (kh, kw) order greater than all before it, or a NaN (the last one);
// values drawn with ties (-0.0 beside +0.0), infinities and NaNs of several payloads.
void check_max_pool(Rng& r, Report& report) {
  const int64_t N = r.range(1, 2), C = r.range(1, 40), KH = r.range(1, 3), KW = r.range(1, 3);
  const int64_t SH = r.range(1, 2), SW = r.range(1, 2), DH = r.range(1, 2), DW = r.range(1, 2);
  const int64_t PH = r.range(0, KH / 2), PW = r.range(0, KW / 2);
  const int64_t H = r.range(DH * (KH - 1) + 1, 20), W = r.range(DW * (KW - 1) + 1, 20);
  const bool ceil = r.coin(), channels_last = r.coin();
  const int64_t OH = pool_length(H, KH, SH, PH, DH, ceil), OW = pool_length(W, KW, SW, PW, DW, ceil);
  const float pick[] = {0.0f, -0.0f, 1.0f, -1.0f, 2.0f, INFINITY, -INFINITY};
  std::vector<float> x(N * C * H * W);
  for (float& v : x) {
    const uint64_t k = r.next() % 24;
    if (k < 7) {
      v = pick[k];
    } else if (k == 7) {
      const uint32_t nan = 0x7fc00000u | static_cast<uint32_t>(r.next() & 0x3fffff);
      std::memcpy(&v, &nan, sizeof v);
    } else {
      v = static_cast<float>(static_cast<int64_t>(r.next() % 5) - 2);
    }
  }
  const int64_t sN = C * H * W, sC = channels_last ? 1 : H * W, sH = channels_last ? W * C : W,
                sW = channels_last ? C : 1;
  // in half the cases a BatchNorm before the pool (pooled first by the kernels): scales of both signs,
  // shifts nonzero or +0.0 where that gives zeros of one sign (graph.floats.batchnorm_before_pool); the
  // definition pools its outputs
  const bool bn = r.coin(), bn_fma = r.coin();
  std::vector<float> scale = r.normals(C), shift = r.normals(C);
  for (int64_t c = 0; c < C; ++c) {
    if (scale[c] == 0.0f) scale[c] = 1.0f;
    if (shift[c] == 0.0f || ((!bn_fma || std::fabs(scale[c]) > 0.5f) && r.coin())) shift[c] = 0.0f;
  }
  auto norm = [&](float v, int64_t c) {
    if (!bn) return v;
    return bn_fma ? std::fma(v, scale[c], shift[c]) : v * scale[c] + shift[c];
  };
  std::vector<float> want(N * OH * OW * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          bool first = true;
          float best = 0.0f;
          for (int64_t i = 0; i < KH; ++i)
            for (int64_t j = 0; j < KW; ++j) {
              const int64_t ih = oh * SH - PH + i * DH, iw = ow * SW - PW + j * DW;
              if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
              const float v = norm(x[n * sN + c * sC + ih * sH + iw * sW], c);
              if (first || v > best || std::isnan(v)) best = v;
              first = false;
            }
          want[((n * OH + oh) * OW + ow) * C + c] = best;
        }
  const MaxPoolGeometry g{N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, sN, sC, sH, sW};
  const std::string text = "N" + str(N) + " C" + str(C) + " " + str(H) + "x" + str(W) + " k" + str(KH) + "x" +
                           str(KW) + " s" + str(SH) + "x" + str(SW) + " p" + str(PH) + "x" + str(PW) + " d" +
                           str(DH) + "x" + str(DW) + (ceil ? " ceil" : "") + (channels_last ? " channels_last" : " nchw") +
                           (bn ? (bn_fma ? " bn fma" : " bn") : "");
  const PoolEpilogue epilogue{scale.data(), shift.data(), bn_fma};
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), 12345.0f);
    max_pool2d_float(x.data(), got.data(), g, static_cast<int>(r.range(1, 2)), bn ? &epilogue : nullptr);
    bool same = true;  // bit for bit (a NaN after a BatchNorm: any NaN)
    for (size_t i = 0; i < got.size(); ++i)
      same &= std::memcmp(&got[i], &want[i], sizeof(float)) == 0 || (bn && std::isnan(got[i]) && std::isnan(want[i]));
    report.check(same, "max_pool2d_float", isa, "", text);
  }
}

// The ordered 1x1 conv (ordered_conv1x1, every ISA) against its definition as a plain loop: each output the
// bias (or +0.0) plus the products in channel order, every product and sum rounded; inputs with zeros of
// both signs, infinities and NaNs (any NaN matches a NaN: which operand's payload an add keeps may differ).
void check_ordered_conv(Rng& r, Report& report) {
  const int64_t N = r.range(1, 2), C = r.range(1, 80), Co = r.range(1, 70), HW = r.range(1, 12);
  const bool with_bias = r.coin();
  const int64_t ld = (Co + kOrderedConvBlock - 1) / kOrderedConvBlock * kOrderedConvBlock;
  std::vector<float> x = r.normals(N * C * HW), w = r.normals(Co * C), bias(ld, 0.0f), wt(C * ld, 0.0f);
  const float pick[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN};
  for (float& v : x)
    if (r.next() % 16 == 0) v = pick[r.next() % 5];
  for (int64_t co = 0; co < Co; ++co) {
    bias[co] = with_bias ? static_cast<float>(r.normals(1)[0]) : 0.0f;
    for (int64_t k = 0; k < C; ++k) wt[k * ld + co] = w[co * C + k] * 1e3f;
  }
  std::vector<float> want(N * Co * HW);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t p = 0; p < HW; ++p) {
        float acc = with_bias ? bias[co] : 0.0f;
        for (int64_t k = 0; k < C; ++k) {
          const float product = x[(n * C + k) * HW + p] * wt[k * ld + co];
          acc = acc + product;
        }
        want[(n * Co + co) * HW + p] = acc;
      }
  const std::string text = "N" + str(N) + " C" + str(C) + " Co" + str(Co) + " HW" + str(HW) + (with_bias ? " bias" : "");
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), 12345.0f);
    ordered_conv1x1(x.data(), N, C, HW, wt.data(), ld, Co, with_bias ? bias.data() : nullptr, got.data(),
                    static_cast<int>(r.range(1, 2)));
    bool same = true;
    for (size_t i = 0; i < got.size(); ++i)
      same &= std::memcmp(&got[i], &want[i], sizeof(float)) == 0 || (std::isnan(got[i]) && std::isnan(want[i]));
    report.check(same, "ordered_conv1x1", isa, "", text);
  }
}

// The depthwise 1x1 conv (channel_affine, every ISA) against its definition as a plain loop: x * w[c] then
// + b[c] (or + 0.0f) rounded twice, or std::fma rounded once; NCHW or channels_last; inputs with zeros of both
// signs, infinities and NaNs (any NaN matches a NaN).
void check_channel_affine(Rng& r, Report& report) {
  const int64_t N = r.range(0, 2), C = r.range(1, 70), HW = r.range(1, 40);
  const bool with_bias = r.coin(), channels_last = r.coin(), fused = r.coin();
  std::vector<float> x = r.normals(N * C * HW), w = r.normals(C), b = r.normals(C);
  const float pick[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN};
  for (float& v : x)
    if (r.next() % 16 == 0) v = pick[r.next() % 5];
  w[0] = -0.0f;  // -0.0 products, which the +0.0 start (or a bias) turns to +0.0
  for (float& v : w) v *= 1e3f;
  std::vector<float> want(x.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < HW; ++p) {
        const int64_t i = channels_last ? (n * HW + p) * C + c : (n * C + c) * HW + p;
        const float bias = with_bias ? b[c] : 0.0f;
        if (fused) {
          want[i] = std::fma(x[i], w[c], bias);
        } else {
          const float product = x[i] * w[c];
          want[i] = product + bias;
        }
      }
  const std::string text = "N" + str(N) + " C" + str(C) + " HW" + str(HW) + (channels_last ? " channels_last" : " nchw") +
                           (with_bias ? " bias" : "") + (fused ? " fma" : "");
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), 12345.0f);
    const ChannelAffine a{x.data(), got.data(), w.data(), with_bias ? b.data() : nullptr, C, HW, channels_last, fused};
    channel_affine(a, N, static_cast<int>(r.range(1, 2)));
    bool same = true;
    for (size_t i = 0; i < got.size(); ++i)
      same &= std::memcmp(&got[i], &want[i], sizeof(float)) == 0 || (std::isnan(got[i]) && std::isnan(want[i]));
    report.check(same, "channel_affine", isa, "", text);
  }
}

// The tap-ordered conv (tap_ordered_conv, every ISA) against its definition as a plain loop: per output one
// std::fma chain over the taps inside the input in (kh, kw, c) order, from +0.0, padding taps skipped; NCHW or
// channels_last input with zeros of both signs, infinities and NaNs, a few infinite weights, and sums that
// underflow to -0.0 (tiny inputs and weights: a padding tap added as 0 * w would make them +0.0); any NaN
// matches a NaN.
void check_tap_conv(Rng& r, Report& report) {
  const int64_t N = r.range(1, 2), C = r.range(1, 4), KH = r.range(1, 7), KW = r.range(1, 7);
  const int64_t SH = r.range(1, 3), SW = r.range(1, 3), PH = r.range(0, KH / 2), PW = r.range(0, KW / 2);
  const int64_t H = r.range(std::max<int64_t>(1, KH - 2 * PH), 20), W = r.range(std::max<int64_t>(1, KW - 2 * PW), 20);
  const int64_t Co = r.range(1, 130), OH = (H + 2 * PH - KH) / SH + 1, OW = (W + 2 * PW - KW) / SW + 1;
  const bool channels_last = r.coin();
  const int64_t ld = (Co + kTapConvBlock - 1) / kTapConvBlock * kTapConvBlock;
  std::vector<float> x = r.normals(N * C * H * W), w = r.normals(Co * C * KH * KW), wt(KH * KW * C * ld, 0.0f);
  const float pick[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN};
  const bool tiny = r.coin();  // products of 1e-30 and -1e-30 underflow: sums of -0.0
  for (float& v : x) {
    if (tiny) v = r.coin() ? 1e-30f : 0.0f;
    if (r.next() % 16 == 0) v = pick[r.next() % 5];
  }
  for (float& v : w) {
    if (tiny) v = v < 0 ? -1e-30f : 1.0f;
    if (r.next() % 64 == 0) v = pick[2 + r.next() % 2];
  }
  for (int64_t co = 0; co < Co; ++co)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw) wt[((kh * KW + kw) * C + c) * ld + co] = w[((co * C + c) * KH + kh) * KW + kw];
  const int64_t sN = C * H * W, sC = channels_last ? 1 : H * W, sH = channels_last ? W * C : W, sW = channels_last ? C : 1;
  std::vector<float> want(N * OH * OW * Co);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t co = 0; co < Co; ++co) {
          float acc = 0.0f;
          for (int64_t kh = 0; kh < KH; ++kh)
            for (int64_t kw = 0; kw < KW; ++kw)
              for (int64_t c = 0; c < C; ++c) {
                const int64_t ih = oh * SH + kh - PH, iw = ow * SW + kw - PW;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                acc = std::fma(x[n * sN + c * sC + ih * sH + iw * sW], w[((co * C + c) * KH + kh) * KW + kw], acc);
              }
          want[((n * OH + oh) * OW + ow) * Co + co] = acc;
        }
  const TapConvGeometry g{N, C, H, W, sN, sC, sH, sW, Co, KH, KW, SH, SW, PH, PW, OH, OW};
  const std::string text = "N" + str(N) + " C" + str(C) + " " + str(H) + "x" + str(W) + " k" + str(KH) + "x" +
                           str(KW) + " s" + str(SH) + "x" + str(SW) + " p" + str(PH) + "x" + str(PW) + " Co" + str(Co) +
                           (channels_last ? " channels_last" : " nchw") + (tiny ? " tiny" : "");
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), 12345.0f);
    tap_ordered_conv(x.data(), wt.data(), ld, got.data(), g, static_cast<int>(r.range(1, 2)));
    bool same = true;
    for (size_t i = 0; i < got.size(); ++i)
      same &= std::memcmp(&got[i], &want[i], sizeof(float)) == 0 || (std::isnan(got[i]) && std::isnan(want[i]));
    report.check(same, "tap_ordered_conv", isa, "", text);
  }
}

// The int8 x int8 conv (int8_conv2d, every ISA's GEMM) against the definition as plain loops: x quantized
// as clamp(round-half-even(fl(x * s)), -127, 127), an exact integer sum over the taps (zero padding), then
// fl(fl(fl(acc / s) * scale) + bias) and an optional BatchNorm rounded once (fma) or twice; in half the
// cases a max pool after it (torch's max_pool2d of those floats), which the kernel takes of the sums
// with each channel's sign sign(scale) * sign(bn_scale) (the epilogue's direction).
void check_int8_conv(Rng& r, Report& report) {
  Int8Conv cv{};
  cv.G = r.coin() ? 1 : 2;
  const int64_t Cg = r.range(1, 24), Og = r.range(1, 20);
  cv.N = r.range(1, 2), cv.C = Cg * cv.G, cv.O = Og * cv.G;
  cv.KH = r.range(1, 3), cv.KW = r.range(1, 3), cv.sh = r.range(1, 2), cv.sw = r.range(1, 2);
  cv.dh = r.range(1, 2), cv.dw = r.range(1, 2), cv.ph = r.range(0, 1), cv.pw = r.range(0, 1);
  cv.H = r.range(cv.dh * (cv.KH - 1) + 1, 12), cv.W = r.range(cv.dw * (cv.KW - 1) + 1, 12);
  cv.divisor = static_cast<float>(r.range(1, 400)) / 8.0f;
  const bool x_channels_last = r.coin(), out_channels_last = r.coin(), bn = r.coin(), bn_fma = r.coin();
  const int64_t N = cv.N, C = cv.C, H = cv.H, W = cv.W, O = cv.O, OH = cv.OH(), OW = cv.OW(), P = OH * OW;
  cv.xs_n = C * H * W;
  cv.xs_c = x_channels_last ? 1 : H * W, cv.xs_h = x_channels_last ? W * C : W, cv.xs_w = x_channels_last ? C : 1;
  std::vector<float> x = r.normals(N * C * H * W);
  for (float& v : x) v *= 6.0f;  // some clamp at +-127
  std::vector<int8_t> w(O * Cg * cv.KH * cv.KW);
  for (int8_t& v : w) v = static_cast<int8_t>(r.range(-127, 127));
  std::vector<float> scale = r.normals(O), bias = r.normals(O), bn_scale = r.normals(O), bn_shift = r.normals(O);
  Int8Epilogue epi;
  epi.scale = scale.data(), epi.bias = bias.data();
  if (bn) epi.bn_scale = bn_scale.data(), epi.bn_shift = bn_shift.data(), epi.bn_fma = bn_fma;
  std::vector<float> y_conv(N * O * P);  // [N, O, OH, OW]
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          int32_t acc = 0;
          const int64_t g = o / Og;
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t i = 0; i < cv.KH; ++i)
              for (int64_t j = 0; j < cv.KW; ++j) {
                const int64_t ih = oh * cv.sh - cv.ph + i * cv.dh, iw = ow * cv.sw - cv.pw + j * cv.dw;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                const float v = x[n * cv.xs_n + (g * Cg + c) * cv.xs_c + ih * cv.xs_h + iw * cv.xs_w];
                const float q = std::nearbyint(v * cv.divisor);
                const int32_t xi = static_cast<int32_t>(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
                acc += xi * w[((o * Cg + c) * cv.KH + i) * cv.KW + j];
              }
          float y = static_cast<float>(acc) / cv.divisor;
          y = y * scale[o];
          y = y + bias[o];
          if (bn) y = bn_fma ? std::fma(y, bn_scale[o], bn_shift[o]) : y * bn_scale[o] + bn_shift[o];
          y_conv[(n * O + o) * P + oh * OW + ow] = y;
        }
  Int8Pool pool{};
  std::vector<int32_t> sign(O);
  const bool pooled = r.coin();
  int64_t POH = OH, POW = OW;
  if (pooled) {
    pool.KH = r.range(1, std::min<int64_t>(3, OH)), pool.KW = r.range(1, std::min<int64_t>(3, OW));
    pool.sh = r.range(1, 2), pool.sw = r.range(1, 2), pool.dh = 1, pool.dw = 1;
    if (pool.KH * 2 - 1 <= OH && r.coin()) pool.dh = 2;
    if (pool.KW * 2 - 1 <= OW && r.coin()) pool.dw = 2;
    pool.ph = r.range(0, pool.KH / 2), pool.pw = r.range(0, pool.KW / 2), pool.ceil_mode = r.coin();
    for (int64_t o = 0; o < O; ++o) sign[o] = ((scale[o] < 0) != (bn && bn_scale[o] < 0)) ? -1 : 1;
    pool.sign = sign.data();
    POH = Int8Pool::out_size(OH, pool.KH, pool.sh, pool.ph, pool.dh, pool.ceil_mode);
    POW = Int8Pool::out_size(OW, pool.KW, pool.sw, pool.pw, pool.dw, pool.ceil_mode);
    epi.pool = &pool;
  }
  const int64_t PP = POH * POW;
  const int64_t os_n = O * PP, os_c = out_channels_last ? 1 : PP, os_p = out_channels_last ? O : 1;
  std::vector<float> want(N * O * PP);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t ph = 0; ph < POH; ++ph)
        for (int64_t pw = 0; pw < POW; ++pw) {
          float m = y_conv[(n * O + o) * P + ph * OW + pw];
          if (pooled) {  // torch's rule: the first of equal values, padding never taken
            bool any = false;
            for (int64_t i = 0; i < pool.KH; ++i)
              for (int64_t j = 0; j < pool.KW; ++j) {
                const int64_t h = ph * pool.sh - pool.ph + i * pool.dh, w_ = pw * pool.sw - pool.pw + j * pool.dw;
                if (h < 0 || h >= OH || w_ < 0 || w_ >= OW) continue;
                const float v = y_conv[(n * O + o) * P + h * OW + w_];
                if (!any || v > m) m = v;
                any = true;
              }
          }
          want[n * os_n + o * os_c + (ph * POW + pw) * os_p] = m;
        }
  std::vector<int8_t> panels(int8_panel_bytes(O, Cg, cv.KH, cv.KW, cv.G));
  std::vector<int32_t> wsum(int8_panel_sums(O, cv.G));
  int8_make_panels(w.data(), O, Cg, cv.KH, cv.KW, cv.G, panels.data(), wsum.data());
  const std::string text = "N" + str(N) + " C" + str(C) + " O" + str(O) + " G" + str(cv.G) + " " + str(H) + "x" +
                           str(W) + " k" + str(cv.KH) + "x" + str(cv.KW) + " s" + str(cv.sh) + "x" + str(cv.sw) +
                           " p" + str(cv.ph) + "x" + str(cv.pw) + " d" + str(cv.dh) + "x" + str(cv.dw) +
                           (x_channels_last ? " x:channels_last" : " x:nchw") +
                           (out_channels_last ? " out:channels_last" : " out:nchw") + (bn ? " bn" : "") +
                           (pooled ? " pool k" + str(pool.KH) + "x" + str(pool.KW) + " s" + str(pool.sh) + "x" +
                                         str(pool.sw) + " p" + str(pool.ph) + "x" + str(pool.pw) + " d" +
                                         str(pool.dh) + "x" + str(pool.dw) + (pool.ceil_mode ? " ceil" : "")
                                   : "");
  for (const std::string& isa : supported_isas()) {
    set_isa(isa);
    std::vector<float> got(want.size(), 12345.0f);
    const bool ran = int8_conv2d(cv, x.data(), panels.data(), wsum.data(), epi, got.data(), os_n, os_c, os_p,
                                 static_cast<int>(r.range(1, 2)));
    report.check(ran && std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0, "int8_conv2d", isa,
                 int8_conv_kernel(), text);
  }
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t seed = 1;
  int64_t count = 200;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if ((a == "--seed" || a == "--count") && i + 1 < argc) {
      char* end = nullptr;
      const char* text = argv[++i];
      const unsigned long long v = std::strtoull(text, &end, 10);
      if (!*text || *end || *text == '-' || (a == "--count" && v > (1ULL << 40)))
        return usage(argv[0], "bad number '" + std::string(text) + "' for " + a);
      if (a == "--seed") seed = v;
      else count = static_cast<int64_t>(v);
    } else if (a == "--verbose") {
      verbose = true;
    } else {
      return usage(argv[0], "unknown argument '" + a + "'");
    }
  }
  std::string isas;
  for (const std::string& isa : supported_isas()) {
    isas += (isas.empty() ? "" : ", ") + isa;
    const std::vector<std::string> tiles = tile_names(isa);
    if (!tiles.empty()) {
      isas += " (tiles";
      for (const std::string& t : tiles) isas += " " + t;
      isas += ")";
    }
  }
  std::printf("check_kernels: seed %llu, %lld cases; ISAs: %s\n", static_cast<unsigned long long>(seed),
              static_cast<long long>(count), isas.c_str());
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every line out before a crash, if one comes
  Report report(verbose);
  Rng r(seed);
  for (int64_t i = 0; i < count; ++i) {
    report.set_case(i);
    check_conv(r, report);
    check_pack(r, report);
    check_planes(r, report);
    check_combine(r, report);
    check_ternary(r, report);
    check_relayout(r, report);
    check_max_pool(r, report);
    check_ordered_conv(r, report);
    check_tap_conv(r, report);
    check_channel_affine(r, report);
    check_int8_conv(r, report);
  }
  return report.finish();
}
