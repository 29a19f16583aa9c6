// AVX2 binary convolution (no vector popcount): nibble lookup with vpshufb.
//
// Both operands are split into low and high nibbles (one per byte) ahead of the
// loop: the weights when a block is repacked, the whole packed input once per call
// (prepare_input), so that popcount(x xor w) per byte = lut[xlo ^ wlo] + lut[xhi ^ whi]
// costs 6 operations per 256 bits: 2 xor, 2 vpshufb, 2 add. The byte counts
// accumulate for up to 31 steps (31 * 8 < 256), then vpsadbw sums them into 64-bit
// lanes. Register tiles (several; the driver picks one per layer, see conv_tiles.h):
//   2x16: 2 output pixels x 4 ymm of 4 channels, 8 byte accumulators in registers, the
//         weights read as memory operands (inline asm step4);
//   3x8, 4x8: 3 or 4 pixels x 2 ymm, the step's 4 weight vectors (low, high nibbles)
//         loaded once into registers and reused by every pixel of the tile.
// Which is faster depends on the core (load ports, register renaming), not on the math.
#include <immintrin.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

constexpr int kVec = 4;  // output channels per ymm (64-bit lanes)
constexpr int64_t kFlush = 31;  // max steps between byte -> qword reductions (31 * 8 < 256)
constexpr uint64_t kLow = 0x0f0f0f0f0f0f0f0fULL;

// A block of up to MaxJ ymm (4 * MaxJ channels).
template <int MaxJ>
size_t block_bytes(const ConvGeometry& g, int nclasses) {
  constexpr int kBlock = kVec * MaxJ;
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kBlock * 8 * 2 + taps * kBlock * 4 + static_cast<size_t>(nclasses) * kBlock * 4 + 256;
}

// Input word i of the rows -> out[2 i] = low nibbles, out[2 i + 1] = high nibbles.
void prepare_input(const uint64_t* x, uint64_t* out, int64_t row0, int64_t row1, const ConvGeometry& g) {
  const int64_t row = g.Wp * g.G * g.Wg, words = (row1 - row0) * row;
  x += row0 * row;
  out += 2 * row0 * row;
  const __m256i low = _mm256_set1_epi8(0x0f);
  int64_t i = 0;
  for (; i + 4 <= words; i += 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    // interleave 64-bit lanes: (lo0 hi0 lo1 hi1) (lo2 hi2 lo3 hi3)
    const __m256i a = _mm256_unpacklo_epi64(lo, hi), b = _mm256_unpackhi_epi64(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * i), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * i + 4), _mm256_permute2x128_si256(a, b, 0x31));
  }
  for (; i < words; ++i) {
    out[2 * i] = x[i] & kLow;
    out[2 * i + 1] = (x[i] >> 4) & kLow;
  }
}

struct Ctx {
  const ConvBlock* b;
  const uint64_t* ws;   // [steps][2][J * 4]: low nibbles, then high nibbles
  const int32_t* corr;  // [nclasses][J * 4]
  int64_t steps;
  int64_t chunk;  // steps per byte-accumulator pass: equal passes of <= kFlush (36 steps: 18 + 18, not 31 + 5)
  int32_t K;
};

// One step of one pixel against 4 ymm of weights (16 channels): acc[j] += lut[xlo ^ wlo[j]]
// + lut[xhi ^ whi[j]]. Written out because GCC reassociates the two adds into
// acc + (lo + hi) and hoists the next pixel's broadcasts, which needs more than AVX2's 16
// registers and spills accumulators to the stack on every step; here the 2-pixel tile keeps
// 8 accumulators, the table, 2 broadcasts and 2 temporaries in registers. The memory it
// reads is declared as "m" operands (no "memory" clobber, which would pin the table and
// the loop's pointers to memory): 5 % faster on the 256-channel layer.
inline void step4(__m256i* acc, __m256i lut, const uint64_t* x, const __m256i* w) {
  __m256i xl, xh, t0, t1;
  __asm__(
      "vpbroadcastq %[x0], %[xl]\n\t"
      "vpbroadcastq %[x1], %[xh]\n\t"
      "vpxor 0(%[w]), %[xl], %[t0]\n\t"
      "vpxor 128(%[w]), %[xh], %[t1]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a0], %[a0]\n\t"
      "vpaddb %[t1], %[a0], %[a0]\n\t"
      "vpxor 32(%[w]), %[xl], %[t0]\n\t"
      "vpxor 160(%[w]), %[xh], %[t1]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a1], %[a1]\n\t"
      "vpaddb %[t1], %[a1], %[a1]\n\t"
      "vpxor 64(%[w]), %[xl], %[t0]\n\t"
      "vpxor 192(%[w]), %[xh], %[t1]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a2], %[a2]\n\t"
      "vpaddb %[t1], %[a2], %[a2]\n\t"
      "vpxor 96(%[w]), %[xl], %[t0]\n\t"
      "vpxor 224(%[w]), %[xh], %[t1]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a3], %[a3]\n\t"
      "vpaddb %[t1], %[a3], %[a3]\n\t"
      : [a0] "+x"(acc[0]), [a1] "+x"(acc[1]), [a2] "+x"(acc[2]), [a3] "+x"(acc[3]), [xl] "=&x"(xl),
        [xh] "=&x"(xh), [t0] "=&x"(t0), [t1] "=&x"(t1)
      : [lut] "x"(lut), [x0] "m"(x[0]), [x1] "m"(x[1]), [w] "r"(w), [wm] "m"(*reinterpret_cast<const __m256i(*)[8]>(w)));
}

// An aligned load the compiler cannot repeat (it keeps the value in a register instead).
inline __m256i load_once(const __m256i* p) {
  __m256i v;
  __asm__("vmovdqa %[m], %[v]" : [v] "=x"(v) : [m] "m"(*p));
  return v;
}

// One step of one pixel against 2 ymm of weights held in registers (8 channels):
// acc[j] += lut[xlo ^ wlo[j]] + lut[xhi ^ whi[j]], as 2 broadcasts, 4 xor, 4 vpshufb and
// 4 adds into the accumulators. Written out for the reason given at step4: compiled from
// intrinsics, GCC adds the two lookups first and then spills accumulators of the 3- and
// 4-pixel tiles (8 accumulators, 4 weights, the table and 3 temporaries: all 16 ymm).
inline void step2(__m256i* acc, __m256i lut, const uint64_t* x, __m256i wl0, __m256i wl1, __m256i wh0,
                  __m256i wh1) {
  __m256i v, t0, t1;
  __asm__(
      "vpbroadcastq %[x0], %[v]\n\t"
      "vpxor %[wl0], %[v], %[t0]\n\t"
      "vpxor %[wl1], %[v], %[t1]\n\t"
      "vpbroadcastq %[x1], %[v]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a0], %[a0]\n\t"
      "vpaddb %[t1], %[a1], %[a1]\n\t"
      "vpxor %[wh0], %[v], %[t0]\n\t"
      "vpxor %[wh1], %[v], %[t1]\n\t"
      "vpshufb %[t0], %[lut], %[t0]\n\t"
      "vpshufb %[t1], %[lut], %[t1]\n\t"
      "vpaddb %[t0], %[a0], %[a0]\n\t"
      "vpaddb %[t1], %[a1], %[a1]\n\t"
      : [a0] "+x"(acc[0]), [a1] "+x"(acc[1]), [v] "=&x"(v), [t0] "=&x"(t0), [t1] "=&x"(t1)
      : [lut] "x"(lut), [x0] "m"(x[0]), [x1] "m"(x[1]), [wl0] "x"(wl0), [wl1] "x"(wl1), [wh0] "x"(wh0), [wh1] "x"(wh1));
}

// The float32 output's epilogue of a tile, 8 channels (two j) a ymm: out = ((K - 2 popcount - correction)
// * scale + bias) * bn_scale + bn_shift + residual, each part only where given (adding a zero bias would turn
// -0.0 into +0.0). Not inlined into the tile: there it would share the step loop's registers (the loop's
// accumulators spilled, as the comment at the tile's own epilogue says); acc64 comes in memory as it is.
template <int P, int J>
__attribute__((noinline)) void float_epilogue(const Ctx& c, const PixInfo* pix, const uint64_t (*acc64)[J][kVec]) {
  const ConvBlock& b = *c.b;
  const ConvOutput& o = *b.o;
  const int64_t ld = o.ld, rld = o.residual_ld;
  float* const out = o.out_f32;
  const float* const residual = o.residual;
  const bool scaled = o.scale != nullptr, biased = o.bias != nullptr, bn = o.bn_scale != nullptr, fma = o.bn_fma;
  const __m256i K = _mm256_set1_epi32(c.K), ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 4
  for (int j = 0; j < J; j += 2) {
    const int64_t cj = b.co0 + j * kVec;
    const int64_t valid = b.nco - j * kVec;  // channels of this ymm in the block (may be < 8)
    const bool full = valid >= 8;
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(full ? 8 : valid)), ids);
    auto load = [&](const float* p) { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); };
    const __m256 scale = scaled ? load(o.scale + cj) : _mm256_set1_ps(1.0f);
    const __m256 bias = biased ? load(o.bias + cj) : _mm256_setzero_ps();
    const __m256 bn_scale = bn ? load(o.bn_scale + cj) : _mm256_set1_ps(1.0f);
    const __m256 bn_shift = bn ? load(o.bn_shift + cj) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      // the four 64-bit counts of j and of j + 1 (< 2^31: their low halves), in channel order
      const __m256 lo = _mm256_load_ps(reinterpret_cast<const float*>(acc64[p][j]));
      const __m256 hi = j + 1 < J ? _mm256_load_ps(reinterpret_cast<const float*>(acc64[p][j + 1])) : _mm256_setzero_ps();
      const __m256i pc = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(lo, hi, 0x88)), 0xd8);
      __m256i a = _mm256_sub_epi32(K, _mm256_add_epi32(pc, pc));
      if (pix[p].cls) {  // the block's corrections are [class][J * 4] ints: j and j + 1 side by side
        const int32_t* corr = c.corr + pix[p].cls * J * kVec + j * kVec;
        a = _mm256_sub_epi32(a, j + 1 < J ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr))
                                          : _mm256_castsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(corr))));
      }
      __m256 f = _mm256_cvtepi32_ps(a);
      if (scaled) f = _mm256_mul_ps(f, scale);
      if (biased) f = _mm256_add_ps(f, bias);
      if (bn) f = fma ? _mm256_fmadd_ps(f, bn_scale, bn_shift) : _mm256_add_ps(_mm256_mul_ps(f, bn_scale), bn_shift);
      if (residual) f = _mm256_add_ps(f, load(residual + pix[p].q * rld + cj));
      // vpmaskmov stores are slow (microcoded on AMD): only for a partial vector
      if (full) _mm256_storeu_ps(out + pix[p].q * ld + cj, f);
      else _mm256_maskstore_ps(out + pix[p].q * ld + cj, m, f);
    }
  }
}

// WReg: the step's weights in registers (for J <= 2), else memory operands.
template <int P, int J, bool WReg>
inline void tile(const Ctx& c, const PixInfo* pix) {
  const ConvBlock& b = *c.b;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i zero = _mm256_setzero_si256();
  // 64-bit totals live in memory (touched once per 31 steps), so that the byte
  // accumulators, the input nibbles and the table keep all 16 ymm registers. The first pass
  // stores them (zeroing them first made GCC call rep stos: 13 % of a 64-channel layer).
  alignas(32) uint64_t acc64[P][J][kVec];
  const uint64_t* xs[P];  // prepared (nibble-split) input: word i at 2 i
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) xs[p] = b.x_prepared + 2 * (pix[p].x - b.x);
  const int64_t* so = b.step_off;
  const int64_t chunk = c.chunk;
  for (int64_t s = 0; s < c.steps;) {
    const bool first = s == 0;
    const int64_t end = s + chunk < c.steps ? s + chunk : c.steps;
    __m256i acc8[P][J];
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) acc8[p][j] = zero;
    for (; s < end; ++s) {
      const int64_t off = 2 * so[s];
      const __m256i* wlo = reinterpret_cast<const __m256i*>(c.ws + s * 2 * J * kVec);
      const __m256i* whi = wlo + J;
      if constexpr (J == 4 && !WReg) {
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) step4(acc8[p], lut, xs[p] + off, wlo);
        continue;
      }
      if constexpr (WReg && J == 2) {
        const __m256i wl0 = load_once(wlo), wl1 = load_once(wlo + 1), wh0 = load_once(whi), wh1 = load_once(whi + 1);
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) step2(acc8[p], lut, xs[p] + off, wl0, wl1, wh0, wh1);
        continue;
      }
#pragma GCC unroll 8
      for (int p = 0; p < P; ++p) {
        const __m256i xl = _mm256_set1_epi64x(static_cast<long long>(xs[p][off]));
        const __m256i xh = _mm256_set1_epi64x(static_cast<long long>(xs[p][off + 1]));
#pragma GCC unroll 8
        for (int j = 0; j < J; ++j) {
          const __m256i cl = _mm256_shuffle_epi8(lut, _mm256_xor_si256(xl, _mm256_load_si256(wlo + j)));
          const __m256i ch = _mm256_shuffle_epi8(lut, _mm256_xor_si256(xh, _mm256_load_si256(whi + j)));
          acc8[p][j] = _mm256_add_epi8(acc8[p][j], _mm256_add_epi8(cl, ch));
        }
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        __m256i* dst = reinterpret_cast<__m256i*>(acc64[p][j]);
        const __m256i counts = _mm256_sad_epu8(acc8[p][j], zero);
        _mm256_store_si256(dst, first ? counts : _mm256_add_epi64(_mm256_load_si256(dst), counts));
      }
  }

  const ConvOutput& o = *b.o;
  if (o.mode == OutMode::float32) return float_epilogue<P, J>(c, pix, acc64);
  // The other outputs' epilogue: acc = K - 2 popcount - correction, 4 channels per xmm. (Written as one
  // loop with a switch per pixel on purpose: split into a loop per output mode, as in the AVX-512 kernel,
  // it makes GCC 12 spill the 4x8 tile's accumulators inside the step loop, 20 % slower.)
  const int64_t ld = o.ld;  // pixel stride of the outputs
  const __m128i K = _mm_set1_epi32(c.K);
  const __m128i ids = _mm_setr_epi32(0, 1, 2, 3);
  uint64_t pending[P];  // bytewise threshold output: the bits of an even j wait for j + 1
#pragma GCC unroll 8
  for (int j = 0; j < J; ++j) {
    const int64_t cj = b.co0 + j * kVec;
    const int64_t valid = b.nco - j * kVec;
    const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(valid < 4 ? valid : 4)), ids);
    __m128i thr = _mm_setzero_si128(), pos = _mm_setzero_si128();
    int64_t out_byte = 0;  // bytewise threshold output: the byte of channels cj & ~7 .. + 7
    if (o.mode == OutMode::threshold) {
      thr = _mm_maskload_epi32(o.thr + cj, m);
      int32_t d[4] = {0, 0, 0, 0};
      for (int l = 0; l < 4 && l < valid; ++l) d[l] = o.dir[cj + l];
      pos = _mm_cmpgt_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d)), _mm_setzero_si128());
      const int64_t c8 = cj - (j % 2) * kVec;
      out_byte = (c8 / o.OCg) * o.OWg * 8 + (c8 % o.OCg) / 8;
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      // The four 64-bit counts are < 2^31: keep their low halves.
      const __m256i lows = _mm256_permutevar8x32_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(acc64[p][j])),
                                                       _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
      const __m128i pc = _mm256_castsi256_si128(lows);
      __m128i a = _mm_sub_epi32(K, _mm_add_epi32(pc, pc));
      if (pix[p].cls)
        a = _mm_sub_epi32(a, _mm_load_si128(reinterpret_cast<const __m128i*>(c.corr + pix[p].cls * J * kVec + j * kVec)));
      switch (o.mode) {
        case OutMode::int32:
          // vpmaskmov stores are slow (microcoded on AMD): only for a partial vector.
          if (valid >= 4)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o.out_i32 + pix[p].q * ld + cj), a);
          else
            _mm_maskstore_epi32(o.out_i32 + pix[p].q * ld + cj, m, a);
          break;
        case OutMode::float32:  // float_epilogue's
          break;
        case OutMode::threshold: {
          const __m128i lt = _mm_cmplt_epi32(a, thr), gt = _mm_cmpgt_epi32(a, thr);
          const __m128i neg = _mm_and_si128(_mm_blendv_epi8(gt, lt, pos), m);
          const uint64_t bits = static_cast<uint32_t>(_mm_movemask_ps(_mm_castsi128_ps(neg)));
          // 4 channels: a bytewise output needs 8, so pairs of j are written together.
          if (b.bits_bytewise) {
            uint8_t* dst = reinterpret_cast<uint8_t*>(o.out_bits + pix[p].obits) + out_byte;
            if (j % 2 == 0) {
              pending[p] = bits;
              if (j + 1 == J) *dst = static_cast<uint8_t>(bits);
            } else {
              *dst = static_cast<uint8_t>(pending[p] | bits << 4);
            }
          } else {
            write_bits(o, pix[p].obits, cj, valid < 4 ? valid : 4, bits, false);
          }
          break;
        }
      }
    }
  }
}

template <int TP, int J, bool WReg>
void run_j(const Ctx& c) {
  const ConvBlock& b = *c.b;
  PixelWalker walker(b);
  PixInfo pix[TP];
  int64_t q = b.q0;
  for (; q + TP <= b.q1; q += TP) {
    for (int p = 0; p < TP; ++p) walker.next(pix[p]);
    tile<TP, J, WReg>(c, pix);
  }
  const int64_t left = b.q1 - q;
  for (int p = 0; p < left; ++p) walker.next(pix[p]);
  if (left >= 2 && TP > 2) {
    tile<2, J, WReg>(c, pix);
    if (left == 3) tile<1, J, WReg>(c, pix + 2);
  } else {
    for (int p = 0; p < left; ++p) tile<1, J, WReg>(c, pix + p);
  }
}

// The block's weights as [steps][2][lanes] nibble-split words, by 4x4 transposes of
// 64-bit words (4 output channels' rows of 4 steps in, 4 steps' vectors out).
void repack(const ConvBlock& b, int J, uint64_t* ws) {
  const ConvGeometry& g = *b.g;
  const int64_t steps = g.KH * g.KW * g.Wg;
  const int lanes = J * kVec;
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ids = _mm256_setr_epi64x(0, 1, 2, 3);
  for (int j = 0; j < J; ++j) {
    const uint64_t* src = b.w + (b.co0 + j * kVec) * steps;
    const int64_t rows = b.nco - j * kVec < kVec ? b.nco - j * kVec : kVec;
    for (int64_t s0 = 0; s0 < steps; s0 += 4) {
      const int64_t n = steps - s0 < 4 ? steps - s0 : 4;
      const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), ids);
      __m256i r[4];
      for (int i = 0; i < 4; ++i)
        r[i] = i < rows ? _mm256_maskload_epi64(reinterpret_cast<const long long*>(src + i * steps + s0), m)
                        : _mm256_setzero_si256();
      const __m256i t0 = _mm256_unpacklo_epi64(r[0], r[1]), t1 = _mm256_unpackhi_epi64(r[0], r[1]);
      const __m256i t2 = _mm256_unpacklo_epi64(r[2], r[3]), t3 = _mm256_unpackhi_epi64(r[2], r[3]);
      const __m256i c[4] = {_mm256_permute2x128_si256(t0, t2, 0x20), _mm256_permute2x128_si256(t1, t3, 0x20),
                            _mm256_permute2x128_si256(t0, t2, 0x31), _mm256_permute2x128_si256(t1, t3, 0x31)};
      for (int i = 0; i < n; ++i) {
        __m256i* dst = reinterpret_cast<__m256i*>(ws + (s0 + i) * 2 * lanes + j * kVec);
        _mm256_store_si256(dst, _mm256_and_si256(c[i], low));
        _mm256_store_si256(dst + J, _mm256_and_si256(_mm256_srli_epi16(c[i], 4), low));
      }
    }
  }
}

// tapsum[t * lanes + l] = Cg - 2 popcount(weights of tap t, lane l), from the split words.
void tap_sums(const ConvBlock& b, int J, const uint64_t* ws, int32_t* tapsum) {
  const ConvGeometry& g = *b.g;
  const int64_t taps = g.KH * g.KW;
  const int lanes = J * kVec;
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t t = 0; t < taps; ++t)
    for (int j = 0; j < J; ++j) {
      __m256i pc = zero;
      for (int64_t k = 0; k < g.Wg; ++k) {
        const __m256i* v = reinterpret_cast<const __m256i*>(ws + (t * g.Wg + k) * 2 * lanes + j * kVec);
        const __m256i bytes =
            _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_load_si256(v)), _mm256_shuffle_epi8(lut, _mm256_load_si256(v + J)));
        pc = _mm256_add_epi64(pc, _mm256_sad_epu8(bytes, zero));
      }
      alignas(32) int64_t counts[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(counts), pc);
      for (int l = 0; l < kVec; ++l)
        tapsum[t * lanes + j * kVec + l] = static_cast<int32_t>(g.Cg - 2 * counts[l]);
    }
}

// Layout of a prepared block (J = its ymm count): [steps][2][J * 4] nibble-split
// weights, [taps][J * 4] tap sums, [nclasses][J * 4] corrections.
struct Prepared {
  uint64_t* ws;
  int32_t* tapsum;
  int32_t* corr;
  Prepared(const ConvGeometry& g, int J, void* base) {
    ws = static_cast<uint64_t*>(base);
    tapsum = reinterpret_cast<int32_t*>(ws + g.KH * g.KW * g.Wg * 2 * J * kVec);
    corr = tapsum + g.KH * g.KW * J * kVec;
  }
};

inline int block_j(const ConvBlock& b) { return static_cast<int>((b.nco + kVec - 1) / kVec); }

void prepare(const ConvBlock& b, void* base) {
  const int J = block_j(b);
  const Prepared pr(*b.g, J, base);
  repack(b, J, pr.ws);
  if (b.row_class) {
    tap_sums(b, J, pr.ws, pr.tapsum);
    class_corrections(b, J * kVec, pr.tapsum, pr.corr);
  }
}

// A tile of TP pixels x MaxJ ymm (a block's last, partial ymm count J <= MaxJ).
template <int TP, int MaxJ, bool WReg>
void compute(const ConvBlock& b, const void* base) {
  const ConvGeometry& g = *b.g;
  const int J = block_j(b);
  const Prepared pr(g, J, const_cast<void*>(base));
  const int64_t steps = g.KH * g.KW * g.Wg, passes = (steps + kFlush - 1) / kFlush;
  Ctx c{&b, pr.ws, pr.corr, steps, (steps + passes - 1) / passes, static_cast<int32_t>(g.Cg * g.KH * g.KW)};
  switch (J) {
    case 1: run_j<TP, 1, WReg>(c); break;
    case 2: run_j<TP, 2 <= MaxJ ? 2 : 1, WReg>(c); break;
    case 3: run_j<TP, 3 <= MaxJ ? 3 : 1, WReg>(c); break;
    default: run_j<TP, 4 <= MaxJ ? 4 : 1, WReg>(c); break;
  }
}

template <int TP, int MaxJ, bool WReg>
constexpr ConvKernel make_tile(const char* name) {
  return ConvKernel{name, kVec * MaxJ, TP, &block_bytes<MaxJ>, &prepare, &compute<TP, MaxJ, WReg>, 2, &prepare_input};
}

}  // namespace

const std::vector<ConvKernel>& conv_kernels_avx2() {
  static const std::vector<ConvKernel> tiles{
      make_tile<2, 4, false>("2x16"),
      make_tile<3, 2, true>("3x8"),
      make_tile<4, 2, true>("4x8"),
  };
  return tiles;
}

}  // namespace onebit
