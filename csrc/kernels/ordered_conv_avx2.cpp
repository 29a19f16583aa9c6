// The ordered convs (ordered_conv.h) on AVX2: the 1x1 conv in tiles of 4 pixels x 16 channels (two 8-float
// vectors), the tap-ordered conv in tiles of 6 pixels x 16 channels.
#include <immintrin.h>

#include "kernels/ordered_conv.h"
#include "kernels/ordered_conv_block.h"

namespace onebit {
namespace {

struct Avx2Floats {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V zero() { return _mm256_setzero_ps(); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};

}  // namespace

void ordered_conv_channels_avx2(const float* x, int64_t C, int64_t HW, const float* wt, int64_t ld,
                                const float* bias, float* out, int64_t co0, int64_t co1) {
  ordered_conv_channels<Avx2Floats, 2, 4>(x, C, HW, wt, ld, bias, out, co0, co1);
}

void tap_conv_rows_avx2(const float* xp, const float* wt, int64_t ld, float* out, const TapConvGeometry& g,
                        int64_t oh0, int64_t oh1) {
  tap_conv_rows<Avx2Floats, 2, 6>(xp, wt, ld, out, g, oh0, oh1);
}

}  // namespace onebit
