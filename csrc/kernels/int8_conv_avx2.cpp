// AVX2 GEMM of the int8 conv: both operands widened to int16 pairs (the weight panels once per conv
// call, before its threads start; the taps of a pixel once per GEMM, for all the blocks) and multiplied
// by vpmaddwd (no vpmaddubsw, whose int16 sums saturate): every partial sum is an exact int32.
#include <immintrin.h>

#include <cstring>
#include <memory>

#include "kernels/int8_conv.h"
#include "kernels/int8_conv_driver.h"

namespace onebit {
namespace int8 {
namespace {

// P pixels x one block of 16 channels (two halves of 8), on operands widened to int16 once per call: the
// block's weights ww[q] = {(w0, w1) half 0, (w2, w3) half 0, (w0, w1) half 1, (w2, w3) half 1} and each
// pixel's taps xw[p] as int16 in order, so int32 lane 2q of a row is (x0, x1) and 2q + 1 is (x2, x3):
// acc += w0 x0 + w1 x1 + w2 x2 + w3 x3 a lane.
template <int P>
void tile(const int32_t* xw, int64_t x_stride, int64_t quads, const int16_t* ww, int32_t* acc, int64_t acc_stride) {
  __m256i sum[P][2];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) sum[p][0] = sum[p][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < quads; ++q) {
    const __m256i* w = reinterpret_cast<const __m256i*>(ww + 64 * q);
    const __m256i lo0 = _mm256_loadu_si256(w), hi0 = _mm256_loadu_si256(w + 1);
    const __m256i lo1 = _mm256_loadu_si256(w + 2), hi1 = _mm256_loadu_si256(w + 3);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m256i x01 = _mm256_set1_epi32(xw[p * x_stride + 2 * q]);
      const __m256i x23 = _mm256_set1_epi32(xw[p * x_stride + 2 * q + 1]);
      sum[p][0] = _mm256_add_epi32(sum[p][0], _mm256_madd_epi16(lo0, x01));
      sum[p][1] = _mm256_add_epi32(sum[p][1], _mm256_madd_epi16(lo1, x01));
      sum[p][0] = _mm256_add_epi32(sum[p][0], _mm256_madd_epi16(hi0, x23));
      sum[p][1] = _mm256_add_epi32(sum[p][1], _mm256_madd_epi16(hi1, x23));
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride), sum[p][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride + 8), sum[p][1]);
  }
}

// n (a multiple of 4) int8 taps sign-extended to int16, in order.
inline void widen_taps(const int8_t* t, int64_t n, int16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + i))));
  for (; i < n; ++i) out[i] = t[i];
}

// A panel row's 8 channels x 4 taps (32 bytes) as int16 pairs (w0, w1) and (w2, w3) a channel.
inline void widen_weights(__m256i v, __m256i* out) {
  const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);  // (w0, w2) a channel
  const __m256i odd = _mm256_srai_epi16(v, 8);                         // (w1, w3)
  _mm256_storeu_si256(out, _mm256_blend_epi16(even, _mm256_slli_epi32(odd, 16), 0xAA));
  _mm256_storeu_si256(out + 1, _mm256_blend_epi16(_mm256_srli_epi32(even, 16), odd, 0xAA));
}

}  // namespace

// The panels widened once per call (int16, twice their bytes): each 32 bytes, 8 channels x 4 taps, as
// the pairs (w0, w1), (w2, w3) of each channel.
static void widen_panels(const int8_t* panels, int64_t bytes, int8_t* out) {
  for (int64_t i = 0; i < bytes; i += 32)
    widen_weights(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(panels + i)), reinterpret_cast<__m256i*>(out + 2 * i));
}

void gemm_avx2(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* /*wsum*/, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  const int64_t taps = quads * kTapGroup;
  std::unique_ptr<int16_t[]> xw(new int16_t[static_cast<size_t>(pixels * taps)]);
  for (int64_t p = 0; p < pixels; ++p) widen_taps(a + p * a_stride, taps, xw.get() + p * taps);
  const int32_t* rows = reinterpret_cast<const int32_t*>(xw.get());
  const int64_t row_stride = taps / 2;  // int32 pairs a pixel
  const int16_t* ww = reinterpret_cast<const int16_t*>(w);  // widened: 64 int16 a quad of a block
  for (int64_t b = 0; b < blocks; ++b) {
    const int16_t* wb = ww + b * quads * 64;
    int32_t* ab = acc + b * kChannelBlock;
    int64_t p = 0;
    for (; p + 4 <= pixels; p += 4) tile<4>(rows + p * row_stride, row_stride, quads, wb, ab + p * acc_stride, acc_stride);
    for (; p < pixels; ++p) tile<1>(rows + p * row_stride, row_stride, quads, wb, ab + p * acc_stride, acc_stride);
  }
}

bool conv_avx2(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return run_conv<gemm_avx2, widen_panels, 2>(conv, x, panels, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace int8
}  // namespace onebit
