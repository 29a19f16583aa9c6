// AVX-512 (VPOPCNTDQ) binary convolution.
//
// A block of up to 8 * MaxJ output channels is repacked so that one zmm holds the same
// (tap, word) of 8 channels. A register tile is P output pixels x MaxJ zmm (P * MaxJ
// accumulators of 8 x 64-bit counts): each step loads MaxJ weight vectors and, per
// pixel, broadcasts one input word and does xor + vpopcntq + add against them.
// Tiles: 6x32 (24 accumulators), 7x32 (28), 8x16 (16, half the weight loads per
// pixel and fewer live registers), 6x16 (12), 12x16 (24: each weight load serves 12 pixels);
// the driver times them and picks one per layer (conv_tiles.h), so the winner on the running
// CPU (Zen 5, Intel's cores with their own port layout) is among them.
#include <immintrin.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

constexpr int kVec = 8;       // output channels per zmm

template <int MaxJ>
size_t block_bytes(const ConvGeometry& g, int nclasses) {
  constexpr int kBlock = kVec * MaxJ;
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kBlock * 8 + taps * kBlock * 4 + static_cast<size_t>(nclasses) * kBlock * 4 + 256;
}

struct Ctx {
  const ConvBlock* b;
  const uint64_t* wr;   // [steps][J * 8]
  const int32_t* corr;  // [nclasses][J * 8]
  int64_t steps;
  int32_t K;
};

// Epilogue, 16 channels (a pair of accumulator vectors) at a time: the low halves of
// the 64-bit counts are gathered into one vector of 16 int32 (one vpermt2d), then
// acc = K - 2 popcount - border correction, and the output is written. The output mode
// is switched on once per channel pair, not per pixel: each mode's loop is straight-line
// code (a per-pixel switch cost a tenth of a 64-channel layer's time).
template <int P, int J>
inline void epilogue(const Ctx& c, const PixInfo* pix, const __m512i (&acc)[P][J]) {
  const ConvBlock& b = *c.b;
  const ConvOutput& o = *b.o;
  const int64_t ld = o.ld;  // pixel stride of the outputs
  const __m512i K = _mm512_set1_epi32(c.K);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
#pragma GCC unroll 2
  for (int h = 0; h < (J + 1) / 2; ++h) {
    const int j0 = 2 * h, j1 = 2 * h + 1;
    const int64_t cj = b.co0 + j0 * kVec;
    const int64_t valid = b.nco - j0 * kVec;
    const __mmask16 m = valid >= 16 ? __mmask16(0xffff) : __mmask16((1u << valid) - 1);
    const int32_t* corr = c.corr + j0 * kVec;
    auto value = [&](int p) {
      __m512i pc;
      if (j1 < J)
        pc = _mm512_permutex2var_epi32(acc[p][j0], evens, acc[p][j1]);
      else
        pc = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(acc[p][j0]));
      __m512i a = _mm512_sub_epi32(K, _mm512_add_epi32(pc, pc));
      if (pix[p].cls) a = _mm512_sub_epi32(a, _mm512_loadu_si512(corr + pix[p].cls * J * kVec));
      return a;
    };
    // The output's pointers are locals: stores through them cannot change them (no reloads per pixel).
    switch (o.mode) {
      case OutMode::int32: {
        int32_t* const out_i32 = o.out_i32 + cj;
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          if (valid >= 16)
            _mm512_storeu_si512(out_i32 + pix[p].q * ld, value(p));
          else
            _mm512_mask_storeu_epi32(out_i32 + pix[p].q * ld, m, value(p));
        }
        break;
      }
      case OutMode::float32: {
        float* const out_f32 = o.out_f32 + cj;
        const float* const residual = o.residual ? o.residual + cj : nullptr;
        // x * 1 and x + (-0) are exact for every x (-0 included): no branch for a missing scale or bias.
        const bool bn = o.bn_scale, fma = o.bn_fma;
        const __m512 scale = o.scale ? _mm512_maskz_loadu_ps(m, o.scale + cj) : _mm512_set1_ps(1.0f);
        const __m512 bias = o.bias ? _mm512_maskz_loadu_ps(m, o.bias + cj) : _mm512_set1_ps(-0.0f);
        __m512 bn_scale = scale, bn_shift = bias;
        if (o.bn_scale) {
          bn_scale = _mm512_maskz_loadu_ps(m, o.bn_scale + cj);
          bn_shift = _mm512_maskz_loadu_ps(m, o.bn_shift + cj);
        }
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          __m512 f = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(value(p)), scale), bias);
          if (bn) f = fma ? _mm512_fmadd_ps(f, bn_scale, bn_shift) : _mm512_add_ps(_mm512_mul_ps(f, bn_scale), bn_shift);
          if (residual) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(m, residual + pix[p].q * o.residual_ld));
          if (valid >= 16)
            _mm512_storeu_ps(out_f32 + pix[p].q * ld, f);
          else
            _mm512_mask_storeu_ps(out_f32 + pix[p].q * ld, m, f);
        }
        break;
      }
      case OutMode::threshold: {
        const __m512i thr = _mm512_maskz_loadu_epi32(m, o.thr + cj);
        const __mmask16 pos = _mm_cmpgt_epi8_mask(_mm_maskz_loadu_epi8(m, o.dir + cj), _mm_setzero_si128());
        int64_t out_byte0 = 0, out_byte1 = 0;
        if (b.bits_bytewise) {
          out_byte0 = (cj / o.OCg) * o.OWg * 8 + (cj % o.OCg) / 8;
          out_byte1 = ((cj + 8) / o.OCg) * o.OWg * 8 + ((cj + 8) % o.OCg) / 8;
        }
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) {
          const __m512i a = value(p);
          const __mmask16 lt = _mm512_cmplt_epi32_mask(a, thr), gt = _mm512_cmpgt_epi32_mask(a, thr);
          const unsigned bits = static_cast<unsigned>(((lt & pos) | (gt & ~pos)) & m);
          uint8_t* px = reinterpret_cast<uint8_t*>(o.out_bits + pix[p].obits);
          if (b.bits_bytewise) {
            // 8-channel groups, 8-aligned inside their output group: whole bytes.
            px[out_byte0] = static_cast<uint8_t>(bits);
            if (valid > 8) px[out_byte1] = static_cast<uint8_t>(bits >> 8);
          } else {
            for (unsigned r = bits; r; r &= r - 1) set_out_bit(o, pix[p].obits, cj + __builtin_ctz(r));
          }
        }
        break;
      }
    }
  }
}

template <int P, int J>
inline void tile(const Ctx& c, const PixInfo* pix) {
  __m512i acc[P][J];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc[p][j] = _mm512_setzero_si512();
  const uint64_t* xs[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) xs[p] = pix[p].x;
  const int64_t* so = c.b->step_off;
  const uint64_t* wp = c.wr;
  for (int64_t s = 0; s < c.steps; ++s, wp += J * kVec) {
    const int64_t off = so[s];
    __m512i w[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) w[j] = _mm512_load_si512(wp + j * kVec);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const __m512i xb = _mm512_set1_epi64(static_cast<long long>(xs[p][off]));
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j)
        acc[p][j] = _mm512_add_epi64(acc[p][j], _mm512_popcnt_epi64(_mm512_xor_si512(xb, w[j])));
    }
  }

  epilogue<P, J>(c, pix, acc);
}

template <int TP, int J>
void run_j(const Ctx& c) {
  const ConvBlock& b = *c.b;
  PixelWalker walker(b);
  PixInfo pix[TP];
  int64_t q = b.q0;
  for (; q + TP <= b.q1; q += TP) {
    for (int p = 0; p < TP; ++p) walker.next(pix[p]);
    tile<TP, J>(c, pix);
  }
  // The last < TP pixels: one tile of 4 / 2 / 1 pixels after another.
  int64_t left = b.q1 - q;
  for (int p = 0; p < left; ++p) walker.next(pix[p]);
  const PixInfo* rest = pix;
  for (; TP > 4 && left >= 4; rest += 4, left -= 4) tile<4, J>(c, rest);
  if (TP > 2 && left >= 2) {
    tile<2, J>(c, rest);
    rest += 2, left -= 2;
  }
  if (left >= 1) tile<1, J>(c, rest);
}

// repack_block with 8x8 transposes of 64-bit words: 8 output channels' rows of 8
// consecutive steps in, 8 steps' vectors of 8 channels out.
void repack(const ConvBlock& b, int J, uint64_t* dst) {
  const ConvGeometry& g = *b.g;
  const int64_t steps = g.KH * g.KW * g.Wg;
  const int lanes = J * kVec;
  for (int j = 0; j < J; ++j) {
    const uint64_t* src = b.w + (b.co0 + j * kVec) * steps;
    const int64_t rows = b.nco - j * kVec < kVec ? b.nco - j * kVec : kVec;
    for (int64_t s0 = 0; s0 < steps; s0 += 8) {
      const int64_t n = steps - s0 < 8 ? steps - s0 : 8;
      const __mmask8 m = static_cast<__mmask8>((1u << n) - 1);
      __m512i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = i < rows ? _mm512_maskz_loadu_epi64(m, src + i * steps + s0) : _mm512_setzero_si512();
      __m512i a[8], c[8];
      for (int i = 0; i < 4; ++i) {
        a[2 * i] = _mm512_unpacklo_epi64(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi64(r[2 * i], r[2 * i + 1]);
      }
      // c[0..3] from rows 0-3, c[4..7] from rows 4-7: steps {0,4}, {2,6}, {1,5}, {3,7}
      for (int h = 0; h < 2; ++h) {
        c[4 * h + 0] = _mm512_shuffle_i64x2(a[4 * h + 0], a[4 * h + 2], 0x88);
        c[4 * h + 1] = _mm512_shuffle_i64x2(a[4 * h + 0], a[4 * h + 2], 0xdd);
        c[4 * h + 2] = _mm512_shuffle_i64x2(a[4 * h + 1], a[4 * h + 3], 0x88);
        c[4 * h + 3] = _mm512_shuffle_i64x2(a[4 * h + 1], a[4 * h + 3], 0xdd);
      }
      __m512i t[8];
      t[0] = _mm512_shuffle_i64x2(c[0], c[4], 0x88);
      t[4] = _mm512_shuffle_i64x2(c[0], c[4], 0xdd);
      t[2] = _mm512_shuffle_i64x2(c[1], c[5], 0x88);
      t[6] = _mm512_shuffle_i64x2(c[1], c[5], 0xdd);
      t[1] = _mm512_shuffle_i64x2(c[2], c[6], 0x88);
      t[5] = _mm512_shuffle_i64x2(c[2], c[6], 0xdd);
      t[3] = _mm512_shuffle_i64x2(c[3], c[7], 0x88);
      t[7] = _mm512_shuffle_i64x2(c[3], c[7], 0xdd);
      for (int i = 0; i < n; ++i) _mm512_store_si512(dst + (s0 + i) * lanes + j * kVec, t[i]);
    }
  }
}

// Per-tap weight sums and border-class corrections for the block's lanes.
void corrections(const ConvBlock& b, int J, const uint64_t* wr, int32_t* tapsum, int32_t* corr) {
  const ConvGeometry& g = *b.g;
  const int64_t taps = g.KH * g.KW;
  const int lanes = J * kVec;
  const __m256i cg = _mm256_set1_epi32(static_cast<int32_t>(g.Cg));
  for (int64_t t = 0; t < taps; ++t)
    for (int j = 0; j < J; ++j) {
      __m512i pc = _mm512_setzero_si512();
      for (int64_t k = 0; k < g.Wg; ++k)
        pc = _mm512_add_epi64(pc, _mm512_popcnt_epi64(_mm512_load_si512(wr + (t * g.Wg + k) * lanes + j * kVec)));
      const __m256i p32 = _mm512_cvtepi64_epi32(pc);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tapsum + t * lanes + j * kVec),
                         _mm256_sub_epi32(cg, _mm256_add_epi32(p32, p32)));
    }
  for (int32_t cls = 1; cls < b.nclasses; ++cls) {
    const uint8_t* padded = b.class_taps + cls * taps;
    for (int j = 0; j < J; ++j) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t t = 0; t < taps; ++t)
        if (padded[t])
          sum = _mm256_add_epi32(sum, _mm256_load_si256(reinterpret_cast<const __m256i*>(tapsum + t * lanes + j * kVec)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(corr + cls * lanes + j * kVec), sum);
    }
  }
}

// Layout of a prepared block (J = its zmm count): [steps][J * 8] weights,
// [taps][J * 8] tap sums, [nclasses][J * 8] corrections.
struct Prepared {
  uint64_t* wr;
  int32_t* tapsum;
  int32_t* corr;
  Prepared(const ConvGeometry& g, int J, void* base) {
    wr = static_cast<uint64_t*>(base);
    tapsum = reinterpret_cast<int32_t*>(wr + g.KH * g.KW * g.Wg * J * kVec);
    corr = tapsum + g.KH * g.KW * J * kVec;
  }
};

inline int block_j(const ConvBlock& b) { return static_cast<int>((b.nco + kVec - 1) / kVec); }

void prepare(const ConvBlock& b, void* base) {
  const int J = block_j(b);
  const Prepared pr(*b.g, J, base);
  repack(b, J, pr.wr);
  if (b.row_class) corrections(b, J, pr.wr, pr.tapsum, pr.corr);
}

template <int TP, int MaxJ>
void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const int J = block_j(b);
  const Prepared pr(g, J, const_cast<void*>(base));
  Ctx c{&b, pr.wr, pr.corr, g.KH * g.KW * g.Wg, static_cast<int32_t>(g.Cg * g.KH * g.KW)};
  switch (J) {
    case 1: run_j<TP, 1>(c); break;
    case 2: run_j<TP, 2 <= MaxJ ? 2 : 1>(c); break;
    case 3: run_j<TP, 3 <= MaxJ ? 3 : 1>(c); break;
    default: run_j<TP, 4 <= MaxJ ? 4 : 1>(c); break;
  }
}

template <int TP, int MaxJ>
constexpr ConvKernel make_tile(const char* name) {
  return ConvKernel{name, kVec * MaxJ, TP, &block_bytes<MaxJ>, &prepare, &compute<TP, MaxJ>, 1, nullptr};
}

}  // namespace

const std::vector<ConvKernel>& conv_kernels_avx512() {
  static const std::vector<ConvKernel> tiles{
      make_tile<6, 4>("6x32"),
      make_tile<7, 4>("7x32"),
      make_tile<8, 2>("8x16"),
      make_tile<6, 2>("6x16"),
      make_tile<12, 2>("12x16"),
  };
  return tiles;
}

}  // namespace onebit
