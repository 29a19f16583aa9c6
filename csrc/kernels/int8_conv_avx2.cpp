// AVX2 GEMM of the int8 conv: both operands widened to int16 pairs (once per call: the weights of a
// block for all its pixels, the taps of a pixel for all the blocks) and multiplied by vpmaddwd (no
// vpmaddubsw, whose int16 sums saturate): every partial sum is an exact int32.
#include <immintrin.h>

#include <cstring>
#include <memory>

#include "kernels/int8_conv.h"
#include "kernels/int8_conv_driver.h"

namespace onebit {
namespace int8 {
namespace {

// int16 lanes of the bytes 0 and 2 of each 32-bit lane (sign-extended), and of the bytes 1 and 3.
inline __m256i even_bytes(__m256i v) { return _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8); }
inline __m256i odd_bytes(__m256i v) { return _mm256_srai_epi16(v, 8); }

// P pixels x one block of 16 channels (two halves of 8), on operands widened once per call: the block's
// weights ww[q] = {even half 0, odd half 0, even half 1, odd half 1} and each pixel's taps
// xw[p][q] = {(x0, x2), (x1, x3)} as int16 pairs: acc += w0 x0 + w2 x2 + w1 x1 + w3 x3 a lane.
template <int P>
void tile(const int32_t* xw, int64_t quads, const int16_t* ww, int32_t* acc, int64_t acc_stride) {
  __m256i sum[P][2];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) sum[p][0] = sum[p][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < quads; ++q) {
    const __m256i* w = reinterpret_cast<const __m256i*>(ww + 64 * q);
    const __m256i we0 = _mm256_loadu_si256(w), wo0 = _mm256_loadu_si256(w + 1);
    const __m256i we1 = _mm256_loadu_si256(w + 2), wo1 = _mm256_loadu_si256(w + 3);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m256i xe = _mm256_set1_epi32(xw[(p * quads + q) * 2]);
      const __m256i xo = _mm256_set1_epi32(xw[(p * quads + q) * 2 + 1]);
      sum[p][0] = _mm256_add_epi32(sum[p][0], _mm256_madd_epi16(we0, xe));
      sum[p][1] = _mm256_add_epi32(sum[p][1], _mm256_madd_epi16(we1, xe));
      sum[p][0] = _mm256_add_epi32(sum[p][0], _mm256_madd_epi16(wo0, xo));
      sum[p][1] = _mm256_add_epi32(sum[p][1], _mm256_madd_epi16(wo1, xo));
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride), sum[p][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride + 8), sum[p][1]);
  }
}

// (x0, x2) and (x1, x3) of a pixel's four taps as int16 pairs (one int32 each).
inline void widen_taps(const int8_t* t, int32_t* out) {
  const auto pair = [](int8_t lo, int8_t hi) {
    return static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(lo)) |
                                (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(hi))) << 16));
  };
  out[0] = pair(t[0], t[2]);
  out[1] = pair(t[1], t[3]);
}

}  // namespace

void gemm_avx2(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* /*wsum*/, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  const int64_t block_stride = quads * kChannelBlock * kTapGroup;
  std::unique_ptr<int32_t[]> xw(new int32_t[static_cast<size_t>(pixels * quads * 2)]);
  for (int64_t p = 0; p < pixels; ++p)
    for (int64_t q = 0; q < quads; ++q) widen_taps(a + p * a_stride + 4 * q, xw.get() + (p * quads + q) * 2);
  std::unique_ptr<int16_t[]> ww(new int16_t[static_cast<size_t>(quads * 64)]);
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* wb = w + b * block_stride;
    for (int64_t q = 0; q < quads; ++q) {  // the block's weights widened once for all the pixels
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + q * 64 + 32));
      __m256i* out = reinterpret_cast<__m256i*>(ww.get() + 64 * q);
      _mm256_storeu_si256(out, even_bytes(w0));
      _mm256_storeu_si256(out + 1, odd_bytes(w0));
      _mm256_storeu_si256(out + 2, even_bytes(w1));
      _mm256_storeu_si256(out + 3, odd_bytes(w1));
    }
    int32_t* ab = acc + b * kChannelBlock;
    int64_t p = 0;
    for (; p + 4 <= pixels; p += 4) tile<4>(xw.get() + p * quads * 2, quads, ww.get(), ab + p * acc_stride, acc_stride);
    for (; p < pixels; ++p) tile<1>(xw.get() + p * quads * 2, quads, ww.get(), ab + p * acc_stride, acc_stride);
  }
}

bool conv_avx2(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return run_conv<gemm_avx2>(conv, x, panels, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace int8
}  // namespace onebit
