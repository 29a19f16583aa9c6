// AVX2 GEMM of the int8 conv: both operands widened to int16 pairs and multiplied by vpmaddwd
// (no vpmaddubsw, whose int16 sums saturate): every partial sum is an exact int32.
#include <immintrin.h>

#include <cstring>

#include "kernels/int8_conv.h"
#include "kernels/int8_conv_driver.h"

namespace onebit {
namespace int8 {
namespace {

// int16 lanes of the bytes 0 and 2 of each 32-bit lane (sign-extended), and of the bytes 1 and 3.
inline __m256i even_bytes(__m256i v) { return _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8); }
inline __m256i odd_bytes(__m256i v) { return _mm256_srai_epi16(v, 8); }

// P pixels x one block of 16 channels (two halves of 8): acc += w0 x0 + w2 x2 + w1 x1 + w3 x3 a lane.
template <int P>
void tile(const int8_t* a, int64_t a_stride, int64_t quads, const int8_t* w, int32_t* acc, int64_t acc_stride) {
  __m256i sum[P][2];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) sum[p][0] = sum[p][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < quads; ++q) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + q * 64 + 32));
    const __m256i we0 = even_bytes(w0), wo0 = odd_bytes(w0), we1 = even_bytes(w1), wo1 = odd_bytes(w1);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      int32_t taps;
      std::memcpy(&taps, a + p * a_stride + 4 * q, 4);
      const __m256i x = _mm256_set1_epi32(taps);
      const __m256i xe = even_bytes(x), xo = odd_bytes(x);
      sum[p][0] = _mm256_add_epi32(sum[p][0], _mm256_add_epi32(_mm256_madd_epi16(we0, xe), _mm256_madd_epi16(wo0, xo)));
      sum[p][1] = _mm256_add_epi32(sum[p][1], _mm256_add_epi32(_mm256_madd_epi16(we1, xe), _mm256_madd_epi16(wo1, xo)));
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride), sum[p][0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + p * acc_stride + 8), sum[p][1]);
  }
}

}  // namespace

void gemm_avx2(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* /*wsum*/, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  const int64_t block_stride = quads * kChannelBlock * kTapGroup;
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* wb = w + b * block_stride;
    int32_t* ab = acc + b * kChannelBlock;
    int64_t p = 0;
    for (; p + 4 <= pixels; p += 4) tile<4>(a + p * a_stride, a_stride, quads, wb, ab + p * acc_stride, acc_stride);
    for (; p < pixels; ++p) tile<1>(a + p * a_stride, a_stride, quads, wb, ab + p * acc_stride, acc_stride);
  }
}

bool conv_avx2(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return run_conv<gemm_avx2>(conv, x, panels, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace int8
}  // namespace onebit
