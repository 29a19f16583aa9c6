// AVX-512 (VPOPCNTDQ) binary convolution writing a float32 NCHW output directly: output pixels in the lanes.
//
// The channels_last kernels (conv_avx512.cpp) hold 8 output channels of one pixel in a zmm, so an NCHW
// output costs a transpose of every value, bound by its cross-lane shuffles (a tenth of a 64-channel conv's
// time). Here a zmm holds one output channel at 8 consecutive pixels of an output row, and a step xors
// the same input word of those 8 pixels (stride 1: consecutive words of a word-planar input
// [N, G * Wg, Hp, Wp]) with that channel's weight word, broadcast. Only for output rows of whole 8-pixel
// groups (OW a multiple of 8): the 8 pixels are all real, so their taps lie inside the padded input and
// plain loads read them (a masked load may wait for the stores before it). A register tile is P groups
// of 8 pixels x J <= 4 channels; a block is 32 channels, 4 at a time against the same groups.
//
// The arithmetic and the epilogue are the channels_last kernels', value for value: acc = K - 2 popcount -
// correction (each lane's border class, looked up in the channel's table of class sums), then float32
// acc * scale + bias, BatchNorm, + residual (NCHW), each rounded as there. Two groups of a channel share
// one vector from the low halves of their counts on: 16 consecutive floats of its plane, one store.
#include <immintrin.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

constexpr int kLanes = 8;     // output pixels per zmm (64-bit counts)
constexpr int kSub = 4;       // output channels per register tile
constexpr int kBlock = 32;    // output channels per block
constexpr int kClasses = 16;  // border classes a channel's table holds (one permute)

// A prepared block: [steps][kBlock] weight words; per channel its border classes' corrections,
// [kBlock][16] int32; per step its word offset from a pixel's first tap; scratch for the class sums.
size_t block_bytes(const ConvGeometry& g, int nclasses) {
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kBlock * 8 + kBlock * kClasses * 4 + steps * 8 + taps * kBlock * 4 + nclasses * kBlock * 4 + 256;
}

struct Prepared {
  uint64_t* wr;     // [steps][kBlock]
  int32_t* table;   // [kBlock][kClasses]
  int64_t* off;     // [steps]
  int32_t* tapsum;  // [taps][kBlock], scratch
  int32_t* corr;    // [nclasses][kBlock], scratch
  Prepared(const ConvGeometry& g, void* base) {
    const int64_t steps = g.KH * g.KW * g.Wg;
    wr = static_cast<uint64_t*>(base);
    table = reinterpret_cast<int32_t*>(wr + steps * kBlock);
    off = reinterpret_cast<int64_t*>(table + kBlock * kClasses);
    tapsum = reinterpret_cast<int32_t*>(off + steps);
    corr = tapsum + g.KH * g.KW * kBlock;
  }
};

void prepare(const ConvBlock& b, void* base) {
  const ConvGeometry& g = *b.g;
  const Prepared pr(g, base);
  repack_block(b, kBlock, pr.wr);
  // step (kh, kw, word k): k planes on, kh * dh rows down, kw * dw words along
  int64_t s = 0;
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw)
      for (int64_t k = 0; k < g.Wg; ++k) pr.off[s++] = (k * g.Hp + kh * g.dh) * g.Wp + kw * g.dw;
  if (!b.row_class) return;
  block_corrections(b, kBlock, pr.wr, pr.tapsum, pr.corr);
  for (int j = 0; j < kBlock; ++j)
    for (int c = 0; c < kClasses; ++c) pr.table[j * kClasses + c] = c < b.nclasses ? pr.corr[c * kBlock + j] : 0;
}

// 8 consecutive output pixels of one output row (rows are whole groups).
struct Group {
  const uint64_t* x;            // lane 0's first tap: lane k's is x + k
  int64_t out;                  // lane 0's output offset in the block's first channel plane
  bool corrected;               // some pixel has a padded tap
  alignas(32) int32_t cls[8];   // lane k: the border class of its pixel
};

struct Ctx {
  const ConvBlock* b;
  const uint64_t* wr;
  const int32_t* table;
  const int64_t* off;
  int64_t steps, plane;
  int32_t K;
};

// The groups of the block's pixels [q0, q1) (multiples of 8, as every row is), in order.
class GroupWalker {
 public:
  GroupWalker(const ConvBlock& b, const uint64_t* x) : b_(b), g_(*b.g) {
    const int64_t plane = g_.OH * g_.OW;
    q_ = b.q0;
    n_ = q_ / plane;
    oh_ = (q_ % plane) / g_.OW;
    ow_ = q_ % g_.OW;
    image_words_ = g_.G * g_.Wg * g_.Hp * g_.Wp;
    x_ = x + (b.co0 / g_.Cog) * g_.Wg * g_.Hp * g_.Wp;  // word 0 of the block's conv group
    out_ = b.co0 * plane;
  }
  bool done() const { return q_ >= b_.q1; }

  void next(Group& grp) {
    grp.x = x_ + n_ * image_words_ + oh_ * g_.Wp + ow_;  // stride 1: the tap (0, 0) of (oh, ow) is (oh, ow)
    grp.out = out_ + n_ * g_.Co * g_.OH * g_.OW + oh_ * g_.OW + ow_;
    grp.corrected = false;
    if (b_.row_class) {
      const __m256i cls = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b_.col_class + ow_)),
                                           _mm256_set1_epi32(b_.row_class[oh_] * b_.ncol_classes));
      if (_mm256_test_epi32_mask(cls, cls)) {
        grp.corrected = true;
        _mm256_store_si256(reinterpret_cast<__m256i*>(grp.cls), cls);
      }
    }
    q_ += kLanes;
    ow_ += kLanes;
    if (ow_ == g_.OW) {
      ow_ = 0;
      if (++oh_ == g_.OH) oh_ = 0, ++n_;
    }
  }

 private:
  const ConvBlock& b_;
  const ConvGeometry& g_;
  const uint64_t* x_;
  int64_t image_words_, out_, q_, n_, oh_, ow_;
};

// The counts of J channels x P groups (P even) to outputs, a channel's two groups a vector: 16 consecutive
// floats of its plane (one store) unless the pair straddles two images (or the second is missing: odd).
template <int J, int P, bool Bn, bool Residual>
__attribute__((always_inline)) inline void epilogue(const Ctx& c, const Group* grp, const __m512i (&acc)[J][P],
                                                    int64_t j0, bool last_missing) {
  static_assert(P % 2 == 0, "groups in pairs");
  const ConvBlock& b = *c.b;
  const ConvOutput& o = *b.o;
  float* const out = o.out_f32;  // locals: stores through them cannot change them
  const float* const residual = o.residual;
  const __m512i K = _mm512_set1_epi32(c.K);
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  constexpr int kPairs = P / 2;
  bool joined[kPairs], corrected[kPairs];
  __m512i cls[kPairs];
#pragma GCC unroll 4
  for (int h = 0; h < kPairs; ++h) {
    const Group &g0 = grp[2 * h], &g1 = grp[2 * h + 1];
    const bool second = !(last_missing && h == kPairs - 1);
    joined[h] = second && g1.out == g0.out + kLanes;
    corrected[h] = g0.corrected || (second && g1.corrected);
    if (corrected[h]) {
      const __m256i zero = _mm256_setzero_si256();
      const __m256i c0 = g0.corrected ? _mm256_load_si256(reinterpret_cast<const __m256i*>(g0.cls)) : zero;
      const __m256i c1 = second && g1.corrected ? _mm256_load_si256(reinterpret_cast<const __m256i*>(g1.cls)) : zero;
      cls[h] = _mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1);
    }
  }
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j) {
    const int64_t ch = b.co0 + j0 + j, at = (j0 + j) * c.plane;
    // x * 1 and x + (-0) are exact for every x: a missing scale or bias changes nothing
    const __m512 scale = _mm512_set1_ps(o.scale ? o.scale[ch] : 1.0f);
    const __m512 bias = _mm512_set1_ps(o.bias ? o.bias[ch] : -0.0f);
    const __m512 bn_scale = _mm512_set1_ps(Bn ? o.bn_scale[ch] : 1.0f);
    const __m512 bn_shift = _mm512_set1_ps(Bn ? o.bn_shift[ch] : 0.0f);
    const int32_t* table = c.table + (j0 + j) * kClasses;
#pragma GCC unroll 4
    for (int h = 0; h < kPairs; ++h) {
      const Group &g0 = grp[2 * h], &g1 = grp[2 * h + 1];
      const __m512i pc = _mm512_permutex2var_epi32(acc[j][2 * h], evens, acc[j][2 * h + 1]);
      __m512i v = _mm512_sub_epi32(K, _mm512_add_epi32(pc, pc));
      if (corrected[h]) v = _mm512_sub_epi32(v, _mm512_permutexvar_epi32(cls[h], _mm512_loadu_si512(table)));
      __m512 f = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), scale), bias);
      if (Bn) f = o.bn_fma ? _mm512_fmadd_ps(f, bn_scale, bn_shift) : _mm512_add_ps(_mm512_mul_ps(f, bn_scale), bn_shift);
      if (joined[h]) {
        if (Residual) f = _mm512_add_ps(f, _mm512_loadu_ps(residual + g0.out + at));
        _mm512_storeu_ps(out + g0.out + at, f);
        continue;
      }
      __m256 lo = _mm512_castps512_ps256(f);
      if (Residual) lo = _mm256_add_ps(lo, _mm256_loadu_ps(residual + g0.out + at));
      _mm256_storeu_ps(out + g0.out + at, lo);
      if (last_missing && h == kPairs - 1) continue;
      __m256 hi = _mm512_extractf32x8_ps(f, 1);
      if (Residual) hi = _mm256_add_ps(hi, _mm256_loadu_ps(residual + g1.out + at));
      _mm256_storeu_ps(out + g1.out + at, hi);
    }
  }
}

// J channels (from the block's j0) x P groups (the last one missing: a repeat of the first, not stored).
template <int J, int P>
inline void tile(const Ctx& c, const Group* grp, int64_t j0, bool last_missing) {
  __m512i acc[J][P];
#pragma GCC unroll 4
  for (int j = 0; j < J; ++j)
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) acc[j][p] = _mm512_setzero_si512();
  const uint64_t* xs[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) xs[p] = grp[p].x;
  const int64_t* off = c.off;
  const uint64_t* w = c.wr + j0;
  for (int64_t s = 0; s < c.steps; ++s, w += kBlock) {
    __m512i wb[J];
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) wb[j] = _mm512_set1_epi64(static_cast<long long>(w[j]));
    const int64_t o = off[s];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      // 8 real pixels of one row: their taps lie in the padded input. (A masked load here may wait for
      // the epilogue's stores on some cores: plain loads only.)
      const __m512i x = _mm512_loadu_si512(xs[p] + o);
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j)
        acc[j][p] = _mm512_add_epi64(acc[j][p], _mm512_popcnt_epi64(_mm512_xor_si512(x, wb[j])));
    }
  }
  const ConvOutput& o = *c.b->o;
  if (o.bn_scale) {
    if (o.residual) epilogue<J, P, true, true>(c, grp, acc, j0, last_missing);
    else epilogue<J, P, true, false>(c, grp, acc, j0, last_missing);
  } else {
    if (o.residual) epilogue<J, P, false, true>(c, grp, acc, j0, last_missing);
    else epilogue<J, P, false, false>(c, grp, acc, j0, last_missing);
  }
}

// P groups against every channel of the block, kSub at a time.
template <int P>
inline void groups(const Ctx& c, const Group* grp, bool last_missing = false) {
  const int64_t nco = c.b->nco;
  int64_t j0 = 0;
  for (; j0 + kSub <= nco; j0 += kSub) tile<kSub, P>(c, grp, j0, last_missing);
  switch (nco - j0) {
    case 1: tile<1, P>(c, grp, j0, last_missing); break;
    case 2: tile<2, P>(c, grp, j0, last_missing); break;
    case 3: tile<3, P>(c, grp, j0, last_missing); break;
    default: break;
  }
}

template <int P>
void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const Prepared pr(g, const_cast<void*>(base));
  const Ctx c{&b, pr.wr, pr.table, pr.off, g.KH * g.KW * g.Wg, g.OH * g.OW, static_cast<int32_t>(g.Cg * g.KH * g.KW)};
  GroupWalker walker(b, b.x_prepared ? b.x_prepared : b.x);
  Group grp[P];
  int n = 0;
  while (!walker.done()) {
    walker.next(grp[n]);
    if (++n == P) {
      groups<P>(c, grp);
      n = 0;
    }
  }
  const bool odd = n % 2;
  if (odd) grp[n++] = grp[0];  // computed, not stored
  const Group* rest = grp;
  for (; P > 4 && n >= 4; rest += 4, n -= 4) groups<4>(c, rest, odd && n == 4);
  if (n) groups<2>(c, rest, odd);
}

// Padded rows [row0, row1) of the packed input, [N, Hp, Wp, G * Wg], made word-planar: [N, G * Wg, Hp, Wp].
void planar_rows(const uint64_t* x, uint64_t* out, int64_t row0, int64_t row1, const ConvGeometry& g) {
  const int64_t gwg = g.G * g.Wg;
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t n = r / g.Hp, hp = r % g.Hp;
    const uint64_t* src = x + r * g.Wp * gwg;
    uint64_t* dst = out + (n * gwg * g.Hp + hp) * g.Wp;
    for (int64_t k = 0; k < gwg; ++k, dst += g.Hp * g.Wp)
      for (int64_t wp = 0; wp < g.Wp; ++wp) dst[wp] = src[wp * gwg + k];
  }
}

// Ranges of 16 pixels: whole pairs of groups, so that a pair's 16 floats start on a 64-byte line.
template <int P>
ConvKernel make_kernel(const char* name, bool planar_input) {
  ConvKernel k{name, kBlock, 2 * kLanes, &block_bytes, &prepare, &compute<P>, 1, planar_input ? &planar_rows : nullptr};
  k.nchw_output = true;
  return k;
}

}  // namespace

const ConvKernel* conv_kernel_nchw_avx512(const ConvGeometry& g, const ConvOutput& o, int nclasses) {
  // stride 1, rows of whole groups (where 8 pixels would wrap onto the next row, the loads this costs
  // make the channels_last kernel and its transposes faster), the border classes in one table
  if (!o.out_nchw || o.mode != OutMode::float32 || (o.residual && !o.residual_nchw) || g.sh != 1 || g.sw != 1 ||
      g.OW % kLanes != 0 || nclasses > kClasses)
    return nullptr;
  static const ConvKernel planar = make_kernel<6>("nchw 48x4", true);
  static const ConvKernel as_packed = make_kernel<6>("nchw 48x4", false);  // G * Wg = 1: already word-planar
  return g.G * g.Wg == 1 ? &as_packed : &planar;
}

}  // namespace onebit
