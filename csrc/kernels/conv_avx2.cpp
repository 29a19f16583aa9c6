// AVX2 binary convolution (no vector popcount): nibble lookup with vpshufb.
//
// A block of up to 16 output channels is repacked with every weight word split
// into its low and high nibbles (one per byte), so that x xor w needs no masking
// on the weight side: popcount bytes = lut[xlo ^ wlo] + lut[xhi ^ whi]. The byte
// counts accumulate for up to 31 steps (31 * 8 < 256) and are then summed into
// 64-bit lanes with vpsadbw. Register tile: 3 output pixels x 4 ymm (4 channels
// each).
#include <immintrin.h>

#include "kernels/conv.h"
#include "kernels/conv_common.h"

namespace onebit {
namespace {

constexpr int kVec = 4;   // output channels per ymm (64-bit lanes)
constexpr int kMaxJ = 4;
constexpr int kBlock = kVec * kMaxJ;
constexpr int kTile = 3;
constexpr int64_t kFlush = 31;  // steps between byte -> qword reductions

size_t scratch_bytes(const ConvGeometry& g, int nclasses) {
  const size_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  return steps * kBlock * 8 * 3 + taps * kBlock * 4 + static_cast<size_t>(nclasses) * kBlock * 4 + 256;
}

struct Ctx {
  const ConvBlock* b;
  const uint64_t* ws;   // [steps][2][J * 4]: low nibbles, then high nibbles
  const int32_t* corr;  // [nclasses][J * 4]
  int64_t steps;
  int32_t K;
};

template <int P, int J>
inline void tile(const Ctx& c, const PixInfo* pix) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2,
                                       2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  __m256i acc64[P][J];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) acc64[p][j] = zero;
  const uint64_t* xs[P];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) xs[p] = pix[p].x;
  const int64_t* so = c.b->step_off;
  for (int64_t s = 0; s < c.steps;) {
    const int64_t end = s + kFlush < c.steps ? s + kFlush : c.steps;
    __m256i acc8[P][J];
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc8[p][j] = zero;
    for (; s < end; ++s) {
      const int64_t off = so[s];
      const uint64_t* wlo = c.ws + s * 2 * J * kVec;
      const uint64_t* whi = wlo + J * kVec;
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m256i xb = _mm256_set1_epi64x(static_cast<long long>(xs[p][off]));
        const __m256i xl = _mm256_and_si256(xb, low);
        const __m256i xh = _mm256_and_si256(_mm256_srli_epi16(xb, 4), low);
#pragma GCC unroll 4
        for (int j = 0; j < J; ++j) {
          const __m256i tl = _mm256_xor_si256(xl, _mm256_load_si256(reinterpret_cast<const __m256i*>(wlo + j * kVec)));
          const __m256i th = _mm256_xor_si256(xh, _mm256_load_si256(reinterpret_cast<const __m256i*>(whi + j * kVec)));
          acc8[p][j] = _mm256_add_epi8(acc8[p][j], _mm256_shuffle_epi8(lut, tl));
          acc8[p][j] = _mm256_add_epi8(acc8[p][j], _mm256_shuffle_epi8(lut, th));
        }
      }
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
      for (int j = 0; j < J; ++j) acc64[p][j] = _mm256_add_epi64(acc64[p][j], _mm256_sad_epu8(acc8[p][j], zero));
  }

  // acc = K - 2 popcount - correction, as int32 [P][J * 4].
  alignas(32) int32_t res[P * J * kVec];
  const __m128i K = _mm_set1_epi32(c.K);
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const int32_t* corr = c.corr + pix[p].cls * J * kVec;
#pragma GCC unroll 4
    for (int j = 0; j < J; ++j) {
      // The four 64-bit counts are < 2^31: take their low halves.
      const __m256i packed = _mm256_permutevar8x32_epi32(acc64[p][j], _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6));
      const __m128i pc = _mm256_castsi256_si128(packed);
      __m128i a = _mm_sub_epi32(K, _mm_add_epi32(pc, pc));
      if (pix[p].cls) a = _mm_sub_epi32(a, _mm_load_si128(reinterpret_cast<const __m128i*>(corr + j * kVec)));
      _mm_store_si128(reinterpret_cast<__m128i*>(res + (p * J + j) * kVec), a);
    }
  }
  epilogue_generic(*c.b, pix, P, res, J * kVec);
}

template <int J>
void run_j(const Ctx& c) {
  const ConvBlock& b = *c.b;
  PixelWalker walker(b);
  PixInfo pix[kTile];
  int64_t q = b.q0;
  for (; q + kTile <= b.q1; q += kTile) {
    for (int p = 0; p < kTile; ++p) walker.next(pix[p]);
    tile<kTile, J>(c, pix);
  }
  const int64_t left = b.q1 - q;
  for (int p = 0; p < left; ++p) walker.next(pix[p]);
  switch (left) {
    case 1: tile<1, J>(c, pix); break;
    case 2: tile<2, J>(c, pix); break;
    default: break;
  }
}

void run(const ConvBlock& b) {
  const ConvGeometry& g = *b.g;
  const int J = static_cast<int>((b.nco + kVec - 1) / kVec);
  const int lanes = J * kVec;
  const int64_t steps = g.KH * g.KW * g.Wg, taps = g.KH * g.KW;
  uint64_t* wr = static_cast<uint64_t*>(b.scratch);  // plain [steps][lanes]
  uint64_t* ws = wr + steps * lanes;                  // nibble split [steps][2][lanes]
  int32_t* tapsum = reinterpret_cast<int32_t*>(ws + steps * 2 * lanes);
  int32_t* corr = tapsum + taps * lanes;
  repack_block(b, lanes, wr);
  const uint64_t low = 0x0f0f0f0f0f0f0f0fULL;
  for (int64_t s = 0; s < steps; ++s)
    for (int l = 0; l < lanes; ++l) {
      ws[s * 2 * lanes + l] = wr[s * lanes + l] & low;
      ws[s * 2 * lanes + lanes + l] = (wr[s * lanes + l] >> 4) & low;
    }
  block_corrections(b, lanes, wr, tapsum, corr);
  Ctx c{&b, ws, corr, steps, static_cast<int32_t>(g.Cg * taps)};
  switch (J) {
    case 1: run_j<1>(c); break;
    case 2: run_j<2>(c); break;
    case 3: run_j<3>(c); break;
    default: run_j<4>(c); break;
  }
}

}  // namespace

const ConvKernel& conv_kernel_avx2() {
  static const ConvKernel kernel{"avx2", kBlock, kTile, &scratch_bytes, &run};
  return kernel;
}

}  // namespace onebit
