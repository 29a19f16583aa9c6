#include <immintrin.h>

#include "kernels/pack.h"

namespace onebit {

// Channels contiguous: movemask of 8 compares per byte of the word.
void pack_row_cl_avx2(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out) {
  const int64_t Wg = words_for(Cg);
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t w = 0; w < W; ++w)
    for (int64_t g = 0; g < G; ++g) {
      const float* src = x + w * sW + g * Cg;
      uint64_t* dst = out + (w * G + g) * Wg;
      const int64_t full = Cg / 64;
      for (int64_t k = 0; k < full; ++k) {
        uint64_t word = 0;
        for (int j = 0; j < 8; ++j) {
          const __m256 v = _mm256_loadu_ps(src + 64 * k + 8 * j);
          word |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_LT_OQ))))
                  << (8 * j);
        }
        dst[k] = word;
      }
      if (full < Wg) {
        uint64_t word = 0;
        for (int64_t c = 64 * full; c < Cg; ++c) word |= static_cast<uint64_t>(src[c] < 0.0f) << (c - 64 * full);
        dst[full] = word;
      }
    }
}

namespace {

// Pixels contiguous (NCHW): transpose-and-pack, 8 pixels at a time; each channel's
// compare mask selects its bit into 8 lanes of 32-bit partial words.
// Prefetch: each channel's line 32 pixels ahead is requested as its group is read (rows of many
// groups, whose channel planes are streams too many for the hardware prefetchers to follow).
template <bool Prefetch>
void pack_row_nchw(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  constexpr int64_t kAhead = 32;  // pixels
  const int64_t Wg = words_for(Cg), px = G * Wg;
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) uint32_t lo_bits[8], hi_bits[8];
  alignas(32) int32_t lane_ids[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  const __m256i ids = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_ids));
  for (int64_t w0 = 0; w0 < W; w0 += 8) {
    const int64_t n = W - w0 < 8 ? W - w0 : 8;
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), ids);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = 0; k < Wg; ++k) {
        const int64_t c0 = g * Cg + 64 * k;
        const int64_t count = Cg - 64 * k < 64 ? Cg - 64 * k : 64;
        const float* src = x + c0 * sC + w0;
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        __m256i bit = _mm256_set1_epi32(1);
        const int64_t count_lo = count < 32 ? count : 32;
        for (int64_t c = 0; c < count_lo; ++c) {
          if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + c * sC + kAhead), _MM_HINT_T0);
          const __m256 v = _mm256_maskload_ps(src + c * sC, valid);
          lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)), bit));
          bit = _mm256_add_epi32(bit, bit);
        }
        bit = _mm256_set1_epi32(1);
        for (int64_t c = 32; c < count; ++c) {
          if (Prefetch) _mm_prefetch(reinterpret_cast<const char*>(src + c * sC + kAhead), _MM_HINT_T0);
          const __m256 v = _mm256_maskload_ps(src + c * sC, valid);
          hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)), bit));
          bit = _mm256_add_epi32(bit, bit);
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(lo_bits), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(hi_bits), hi);
        uint64_t* dst = out + w0 * px + g * Wg + k;
        for (int64_t i = 0; i < n; ++i) dst[i * px] = lo_bits[i] | static_cast<uint64_t>(hi_bits[i]) << 32;
      }
  }
}

}  // namespace

void pack_row_nchw_avx2(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out) {
  if (W >= 32) return pack_row_nchw<true>(x, W, sC, Cg, G, out);
  pack_row_nchw<false>(x, W, sC, Cg, G, out);
}

}  // namespace onebit
