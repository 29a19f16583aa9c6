#include <immintrin.h>

#include "kernels/pack.h"

namespace onebit {

// Channels contiguous: one compare-into-mask per 16 channels.
void pack_row_cl_avx512(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = 0; w < W; ++w)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = x + w * sW + g * Cg;
      uint64_t* dst = out + (w * G + g) * Wg;
      for (int64_t k = 0; k < Wg; ++k) {
        uint64_t word = 0;
        for (int j = 0; j < 4; ++j) {
          const int64_t begin = 64 * k + 16 * j;
          if (begin >= Cg) break;
          const int64_t left = Cg - begin;
          const __mmask16 load = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
          const __m512 v = _mm512_maskz_loadu_ps(load, src + begin);
          word |= static_cast<uint64_t>(_mm512_mask_cmp_ps_mask(load, v, zero, _CMP_LT_OQ)) << (16 * j);
        }
        dst[k] = word;
      }
    }
}

namespace {

// Pixels contiguous (NCHW): a transpose-and-pack. For 16 pixels at a time, each
// channel's compare mask ORs the channel's bit into 16 lanes of 32-bit partial
// words (channels 0-31 and 32-63 of a word in two registers). Prefetch: each channel's
// line two groups ahead is requested as its group is read (rows of many groups, whose
// channel planes are streams too many for the hardware prefetchers to follow).
template <bool Prefetch>
void pack_row_nchw(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  constexpr int64_t kAhead = 32;  // pixels
  const int64_t Wg = words_for(Cg), px = G * Wg;
  const __m512 zero = _mm512_setzero_ps();
  alignas(64) uint32_t lo_bits[16], hi_bits[16];
  for (int64_t w0 = 0; w0 < W; w0 += 16) {
    const int64_t n = W - w0 < 16 ? W - w0 : 16;
    const __mmask16 valid = n == 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Wg; ++k) {
        const int64_t c0 = g * Cg + 64 * k;
        const int64_t count = Cg - 64 * k < 64 ? Cg - 64 * k : 64;
        const float* src = x + c0 * sC + w0;
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        __m512i bit = _mm512_set1_epi32(1);
        const int64_t count_lo = count < 32 ? count : 32;
        for (int64_t c = 0; c < count_lo; ++c) {
          if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + c * sC + kAhead), _MM_HINT_T0);
          const __m512 v = _mm512_maskz_loadu_ps(valid, src + c * sC);
          lo = _mm512_mask_or_epi32(lo, _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_LT_OQ), lo, bit);
          bit = _mm512_add_epi32(bit, bit);
        }
        bit = _mm512_set1_epi32(1);
        for (int64_t c = 32; c < count; ++c) {
          if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + c * sC + kAhead), _MM_HINT_T0);
          const __m512 v = _mm512_maskz_loadu_ps(valid, src + c * sC);
          hi = _mm512_mask_or_epi32(hi, _mm512_mask_cmp_ps_mask(valid, v, zero, _CMP_LT_OQ), hi, bit);
          bit = _mm512_add_epi32(bit, bit);
        }
        _mm512_store_si512(lo_bits, lo);
        _mm512_store_si512(hi_bits, hi);
        uint64_t* dst = out + w0 * px + g * Wg + k;
        for (int64_t i = 0; i < n; ++i) dst[i * px] = lo_bits[i] | static_cast<uint64_t>(hi_bits[i]) << 32;
      }
  }
}

}  // namespace

void pack_row_nchw_avx512(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  if (W >= 32) return pack_row_nchw<true>(x, W, sC, Cg, G, out);
  pack_row_nchw<false>(x, W, sC, Cg, G, out);
}

}  // namespace onebit
