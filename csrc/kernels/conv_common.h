// Helpers shared by the per-ISA convolution kernels (conv_scalar.cpp, conv_avx2.cpp,
// conv_avx512.cpp). Everything here has internal linkage (anonymous namespace):
// each kernel file is compiled with its own -m flags, and an inline function shared
// across those files could otherwise be merged by the linker into one copy built for
// the widest ISA.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/conv.h"

namespace onebit {
namespace {

struct PixInfo {
  const uint64_t* x;  // the pixel's (0, 0) tap, this block's group, word 0
  int64_t q;          // flattened output pixel
  int64_t obits;      // threshold output: word offset of the pixel in the packed output
  int32_t cls;        // border class (0 = interior / no correction)
};

// Walks output pixels q0, q0 + 1, ... Along an output row every field advances by a
// constant (the input pointer by stride * words per pixel, the packed output by a pixel);
// only a new row recomputes them from (n, oh). A pixel costs a few adds and one load.
struct PixelWalker {
  const ConvBlock& b;
  const ConvGeometry& g;
  int64_t n, oh, ow, q;
  const uint64_t* xg;     // x + group offset
  const uint64_t* x_at;   // the next pixel's (0, 0) tap
  int64_t x_step;         // words between horizontally adjacent output pixels' taps
  int64_t obits_at;       // the next pixel's packed output word (threshold outputs)
  int64_t gwg, ohp, owp, owords;
  int32_t row_cls;        // row class * column classes (0 without a correction)
  bool threshold;

  explicit PixelWalker(const ConvBlock& blk) : b(blk), g(*blk.g) {
    q = b.q0;
    ow = q % g.OW;
    oh = (q / g.OW) % g.OH;
    n = q / (g.OW * g.OH);
    xg = b.x + (b.co0 / g.Cog) * g.Wg;
    gwg = g.G * g.Wg;
    x_step = g.sw * gwg;
    const ConvOutput& o = *b.o;
    threshold = o.mode == OutMode::threshold;
    ohp = g.OH + 2 * o.oph;
    owp = g.OW + 2 * o.opw;
    owords = o.OG * o.OWg;
    start_row();
  }

  void start_row() {
    x_at = xg + ((n * g.Hp + oh * g.sh) * g.Wp + ow * g.sw) * gwg;
    row_cls = b.row_class ? b.row_class[oh] * b.ncol_classes : 0;
    obits_at = threshold ? ((n * ohp + oh + b.o->oph) * owp + ow + b.o->opw) * owords : 0;
  }

  void next(PixInfo& p) {
    p.x = x_at;
    p.q = q;
    p.cls = b.row_class ? row_cls + b.col_class[ow] : 0;
    p.obits = obits_at;
    ++q;
    x_at += x_step;
    obits_at += threshold ? owords : 0;
    if (++ow == g.OW) {
      ow = 0;
      if (++oh == g.OH) {
        oh = 0;
        ++n;
      }
      if (q < b.q1) start_row();
    }
  }
};

// Copies the block's weights into [steps][lanes] (steps = KH * KW * Wg), output
// channel co0 + l in lane l, lanes >= nco zero.
inline void repack_block(const ConvBlock& b, int lanes, uint64_t* dst) {
  const ConvGeometry& g = *b.g;
  const int64_t steps = g.KH * g.KW * g.Wg;
  const int n = static_cast<int>(b.nco < lanes ? b.nco : lanes);
  const uint64_t* src = b.w + b.co0 * steps;
  // Sequential stores; the lanes' rows are read side by side (one cache line each).
  for (int64_t s = 0; s < steps; ++s, dst += lanes) {
    for (int l = 0; l < n; ++l) dst[l] = src[l * steps + s];
    for (int l = n; l < lanes; ++l) dst[l] = 0;
  }
}

// Zero-padding corrections for the block: corr[cls * lanes + l] = sum over the taps
// padded in class cls of (Cg - 2 popcount(w[co0 + l, tap])), the tap's contribution
// against an all +1 input. tapsum is scratch of taps * lanes int32.
// The class sums alone, from tapsum[t * lanes + l] = Cg - 2 popcount(w[co0 + l, tap t]).
inline void class_corrections(const ConvBlock& b, int lanes, const int32_t* tapsum, int32_t* corr);

inline void block_corrections(const ConvBlock& b, int lanes, const uint64_t* wr, int32_t* tapsum, int32_t* corr) {
  if (!b.row_class) return;
  const ConvGeometry& g = *b.g;
  const int64_t taps = g.KH * g.KW;
  for (int64_t t = 0; t < taps; ++t)
    for (int l = 0; l < lanes; ++l) {
      int32_t pc = 0;
      for (int64_t k = 0; k < g.Wg; ++k) pc += __builtin_popcountll(wr[(t * g.Wg + k) * lanes + l]);
      tapsum[t * lanes + l] = static_cast<int32_t>(g.Cg) - 2 * pc;
    }
  class_corrections(b, lanes, tapsum, corr);
}

inline void class_corrections(const ConvBlock& b, int lanes, const int32_t* tapsum, int32_t* corr) {
  if (!b.row_class) return;
  const int64_t taps = b.g->KH * b.g->KW;
  for (int l = 0; l < lanes; ++l) corr[l] = 0;
  for (int32_t c = 1; c < b.nclasses; ++c) {
    int32_t* dst = corr + c * lanes;
    for (int l = 0; l < lanes; ++l) dst[l] = 0;
    const uint8_t* padded = b.class_taps + c * taps;
    for (int64_t t = 0; t < taps; ++t)
      if (padded[t])
        for (int l = 0; l < lanes; ++l) dst[l] += tapsum[t * lanes + l];
  }
}

// Sets bit (-1) for output channel c of a packed output pixel (zeroed beforehand).
// Byte-wide read-modify-write: when blocks are 8-channel aligned (ConvBlock::
// bits_bytewise) two threads never touch the same byte; otherwise the driver gives
// every pixel to one thread.
inline void set_out_bit(const ConvOutput& o, int64_t obits, int64_t c) {
  const int64_t og = c / o.OCg, bit = c % o.OCg;
  uint8_t* bytes = reinterpret_cast<uint8_t*>(o.out_bits + obits + og * o.OWg);
  bytes[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
}

// Writes the threshold bits of channels co0 .. co0 + n - 1 (bit l of `bits` for channel
// co0 + l) of one packed output pixel. Bytewise: co0 and n are multiples of 8 and the
// output groups hold multiples of 8 channels, so whole bytes are stored (no zeroing
// needed, no sharing with other blocks); otherwise bit by bit into zeroed words.
inline void write_bits(const ConvOutput& o, int64_t obits, int64_t co0, int64_t n, uint64_t bits, bool bytewise) {
  if (bytewise) {
    for (int64_t k = 0; k < n; k += 8) {
      const int64_t c = co0 + k, og = c / o.OCg, bit = c % o.OCg;
      reinterpret_cast<uint8_t*>(o.out_bits + obits + og * o.OWg)[bit / 8] = static_cast<uint8_t>(bits >> k);
    }
    return;
  }
  for (; bits; bits &= bits - 1) {
    const int64_t c = co0 + __builtin_ctzll(bits), og = c / o.OCg, bit = c % o.OCg;
    reinterpret_cast<uint8_t*>(o.out_bits + obits + og * o.OWg)[bit / 8] |= static_cast<uint8_t>(1u << (bit % 8));
  }
}

// A BatchNorm's y * scale + shift: one rounding (std::fma) or two.
inline float batchnorm(float y, float scale, float shift, bool fused) {
  if (fused) return std::fma(y, scale, shift);
  const float scaled = y * scale;
  return scaled + shift;
}

inline bool threshold_bit(int32_t acc, int32_t thr, int8_t dir) { return dir > 0 ? acc < thr : acc > thr; }

// Portable epilogue: acc[p * ld + l] holds the (corrected) integer results of
// pixel p, channel co0 + l.
inline void epilogue_generic(const ConvBlock& b, const PixInfo* pix, int cnt, const int32_t* acc, int ld) {
  const ConvOutput& o = *b.o;
  const int64_t out_ld = o.ld;  // pixel stride of the outputs
  for (int p = 0; p < cnt; ++p) {
    const int32_t* a = acc + p * ld;
    switch (o.mode) {
      case OutMode::int32: {
        int32_t* dst = o.out_i32 + pix[p].q * out_ld + b.co0;
        for (int64_t l = 0; l < b.nco; ++l) dst[l] = a[l];
        break;
      }
      case OutMode::float32: {
        float* dst = o.out_f32 + pix[p].q * out_ld + b.co0;
        for (int64_t l = 0; l < b.nco; ++l) {
          float f = static_cast<float>(a[l]);
          if (o.scale) f = f * o.scale[b.co0 + l];
          if (o.bias) f = f + o.bias[b.co0 + l];
          if (o.bn_scale) f = batchnorm(f, o.bn_scale[b.co0 + l], o.bn_shift[b.co0 + l], o.bn_fma);
          if (o.residual) f = f + o.residual[pix[p].q * o.residual_ld + b.co0 + l];
          dst[l] = f;
        }
        break;
      }
      case OutMode::threshold: {
        for (int64_t l = 0; l < b.nco; ++l) {
          const int64_t c = b.co0 + l;
          if (threshold_bit(a[l], o.thr[c], o.dir[c])) set_out_bit(o, pix[p].obits, c);
        }
        break;
      }
    }
  }
}

}  // namespace
}  // namespace onebit
