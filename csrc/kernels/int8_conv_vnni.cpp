// AVX-512 VNNI GEMM of the int8 conv: vpdpbusd on x + 128 (unsigned) and the signed weights; each
// sum starts at -128 * sum(w), so it ends exact: sum (x + 128) w - 128 sum w = sum x w.
#include <immintrin.h>

#include <cstring>

#include "kernels/int8_conv.h"
#include "kernels/int8_conv_driver.h"

namespace onebit {
namespace int8 {
namespace {

// acc += dpbusd(u, s) in place (GCC otherwise copies every loop-carried accumulator each use).
inline void dpbusd(__m512i& acc, __m512i u, __m512i s) { __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s)); }

// P pixels x B blocks of 16 channels, one accumulator each: every panel vector loaded once for the P
// pixels, every pixel's four taps broadcast once for the B blocks.
template <int P, int B>
void tile(const int8_t* a, int64_t a_stride, int64_t quads, const int8_t* w, int64_t block_stride,
          const int32_t* wsum, int32_t* acc, int64_t acc_stride) {
  const __m512i offset = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512i sum[P][B];
#pragma GCC unroll 4
  for (int b = 0; b < B; ++b) {
    const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(),
                                          _mm512_slli_epi32(_mm512_loadu_si512(wsum + b * kChannelBlock), 7));
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) sum[p][b] = init;
  }
  for (int64_t q = 0; q < quads; ++q) {
    __m512i wv[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(w + b * block_stride + q * 64);
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      int32_t taps;
      std::memcpy(&taps, a + p * a_stride + 4 * q, 4);
      const __m512i x = _mm512_xor_si512(_mm512_set1_epi32(taps), offset);  // x + 128 as unsigned bytes
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) dpbusd(sum[p][b], x, wv[b]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) _mm512_storeu_si512(acc + p * acc_stride + b * kChannelBlock, sum[p][b]);
}

template <int P>
void pixels_pass(const int8_t* a, int64_t a_stride, int64_t quads, const int8_t* w, const int32_t* wsum,
                 int64_t blocks, int32_t* acc, int64_t acc_stride) {
  const int64_t block_stride = quads * kChannelBlock * kTapGroup;
  int64_t b = 0;
  for (; b + 4 <= blocks; b += 4)
    tile<P, 4>(a, a_stride, quads, w + b * block_stride, block_stride, wsum + b * kChannelBlock,
               acc + b * kChannelBlock, acc_stride);
  for (; b < blocks; ++b)
    tile<P, 1>(a, a_stride, quads, w + b * block_stride, block_stride, wsum + b * kChannelBlock,
               acc + b * kChannelBlock, acc_stride);
}

}  // namespace

void gemm_vnni(const int8_t* a, int64_t a_stride, int64_t pixels, int64_t quads, const int8_t* w,
               const int32_t* wsum, int64_t blocks, int32_t* acc, int64_t acc_stride) {
  int64_t p = 0;
  for (; p + 4 <= pixels; p += 4)
    pixels_pass<4>(a + p * a_stride, a_stride, quads, w, wsum, blocks, acc + p * acc_stride, acc_stride);
  for (; p < pixels; ++p)
    pixels_pass<1>(a + p * a_stride, a_stride, quads, w, wsum, blocks, acc + p * acc_stride, acc_stride);
}

bool conv_vnni(const Int8Conv& conv, const float* x, const int8_t* panels, const int32_t* wsum, const Int8Epilogue& epi,
               float* out, int64_t os_n, int64_t os_c, int64_t os_p, int threads) {
  return run_conv<gemm_vnni>(conv, x, panels, wsum, epi, out, os_n, os_c, os_p, threads);
}

}  // namespace int8
}  // namespace onebit
