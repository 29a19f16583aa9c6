// Bit planes of k-bit activations, and the sum of a stacked binary conv's plane pairs (bitplanes.h).
// The float operations are written one by one (-ffp-contract=off) in torch's order.
#include "kernels/bitplanes.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels/conv.h"
#include "kernels/dispatch.h"
#include "kernels/pack.h"
#include "kernels/parallel.h"

// The elementwise loops, also built for AVX2 and AVX-512 and picked by the CPU at load time
// (the same IEEE operations in every version: the results do not depend on the choice).
#if ONEBIT_X86 && defined(__GNUC__) && !defined(__clang__)
#define ONEBIT_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ONEBIT_VECTOR_CLONES
#endif

namespace onebit {
namespace {

// |x|'s bit pattern, an integer above that of infinity (0x7f800000) exactly for a NaN
inline uint32_t magnitude_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7fffffffu;
}

// Level indices of `count` values with stride `stride` (the loop the compiler vectorizes); returns
// whether one of them is NaN (whose index is meaningless: the caller makes the layer's outputs that
// read it NaN). The test is an integer max of the magnitudes' bit patterns: a few vector integer
// operations, no float compare to widen into a mask.
ONEBIT_VECTOR_CLONES
bool level_indices(const float* x, int64_t count, int64_t stride, bool symmetric, float n, float clip, uint8_t* q) {
  uint32_t top = 0;
  if (symmetric) {
    for (int64_t k = 0; k < count; ++k) {
      float v = x[k * stride];
      const uint32_t m = magnitude_bits(v);
      top = m > top ? m : top;
      v = v < -clip ? -clip : (v > clip ? clip : v);
      float u = v / clip;
      u = u + 1.0f;
      u = u / 2.0f;
      u = u * n;
      u = u + 0.5f;
      q[k] = static_cast<uint8_t>(static_cast<int32_t>(u));  // u >= 0.5: truncation is floor
    }
  } else {
    const float magic = 8388608.0f;  // 2^23: (v + 2^23) - 2^23 rounds 0 <= v < 2^23 half to even
    for (int64_t k = 0; k < count; ++k) {
      float v = x[k * stride];
      const uint32_t m = magnitude_bits(v);
      top = m > top ? m : top;
      v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
      v = v * n;
      const float r = v + magic;  // no -ffast-math: never reassociated away
      q[k] = static_cast<uint8_t>(static_cast<int32_t>(r - magic));
    }
  }
  return top > 0x7f800000u;
}

// Plane i of level indices as +-1 floats.
ONEBIT_VECTOR_CLONES
void plane_signs(const uint8_t* q, int64_t count, int i, float* out) {
  for (int64_t e = 0; e < count; ++e) out[e] = static_cast<float>(2 * ((q[e] >> i) & 1) - 1);
}

// One output pixel of combine_planes.
ONEBIT_VECTOR_CLONES
void combine_pixel(const int32_t* src, int64_t Pa, int64_t G, int64_t Pw, int64_t Cog, const int32_t* coeff,
                   const int32_t* offset, int shift, float divisor, const float* scale, const float* bias,
                   int32_t* acc, float* o) {
  const int64_t Co = G * Cog;
  for (int64_t c = 0; c < Co; ++c) acc[c] = offset ? offset[c] : 0;
  for (int64_t i = 0; i < Pa; ++i)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < Pw; ++j) {
        const int32_t f = coeff[i * Pw + j];
        const int32_t* s = src + ((i * G + g) * Pw + j) * Cog;
        int32_t* a = acc + g * Cog;
        for (int64_t c = 0; c < Cog; ++c) a[c] += f * s[c];
      }
  for (int64_t c = 0; c < Co; ++c) {
    float v = static_cast<float>(acc[c] >> shift);  // an exact multiple of 2^shift
    v = v / divisor;
    if (scale) v = v * scale[c];
    if (bias) v = v + bias[c];
    o[c] = v;
  }
}

}  // namespace

bool pack_integer_planes(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC,
                         int64_t sH, int64_t sW, int64_t ph, int64_t pw, int64_t G, bool symmetric, int bits,
                         float clip, uint64_t* out, int threads) {
  if (bits < 1 || bits > 8) throw std::invalid_argument("pack_integer_planes: bits must be in [1, 8]");
  if (G < 1 || C % G) throw std::invalid_argument("pack_integer_planes: groups must divide the channels");
  if (symmetric && !(clip > 0.0f)) throw std::invalid_argument("pack_integer_planes: clip must be positive");
  const int64_t P = bits, Cg = C / G, Wg = words_for(Cg), Hp = H + 2 * ph, Wp = W + 2 * pw;
  const int64_t px = P * G * Wg;  // words per packed pixel
  const float n = static_cast<float>((1 << bits) - 1);
  fill_packed_border(out, N, H, W, ph, pw, P * G, Cg, symmetric ? 0 : -1);
  const bool channels_contiguous = sC == 1;
  const IsaKernels& k = isa_kernels(active_isa());
  const PackRow pack_row = channels_contiguous ? k.pack_row_cl : k.pack_row_nchw;
  const int64_t rows = N * H;
  // A dense tensor (NCHW or channels_last, no gaps): its level indices in one pass over memory,
  // in memory order; then each row's q is read with the tensor's own strides.
  const int64_t total = N * C * H * W;
  const bool dense = (sW == 1 && sH == W && sC == H * W && sN == C * H * W) ||
                     (sC == 1 && sW == C && sH == W * C && sN == H * W * C);
  std::vector<uint8_t> all_q(dense ? static_cast<size_t>(total) : 0);
  const int chunks = static_cast<int>(std::min<int64_t>(rows, 4 * std::max(threads, 1)));
  std::vector<uint8_t> nan(static_cast<size_t>(std::max(chunks, 1)), 0);  // per chunk: a NaN was seen
  if (dense) {
    parallel_chunks(std::max(1, std::min(threads, chunks)), chunks, [&](int chunk) {
      const int64_t e0 = total * chunk / chunks, e1 = total * (chunk + 1) / chunks;
      nan[chunk] = level_indices(x + e0, e1 - e0, 1, symmetric, n, clip, all_q.data() + e0);
    });
  }
  parallel_chunks(std::max(1, std::min(threads, chunks)), chunks, [&](int chunk) {
    std::vector<uint8_t> q(static_cast<size_t>(W * C));
    std::vector<float> plane(static_cast<size_t>(W * C));
    std::vector<uint64_t> words(static_cast<size_t>(W * G * Wg));
    for (int64_t r = rows * chunk / chunks; r < rows * (chunk + 1) / chunks; ++r) {
      const int64_t nn = r / H, h = r % H;
      // q of this row in its own order: [W, C] when channels are contiguous, else [C, W]
      if (dense && channels_contiguous) {
        std::memcpy(q.data(), all_q.data() + nn * sN + h * sH, static_cast<size_t>(W * C));
      } else if (dense) {
        for (int64_t c = 0; c < C; ++c) std::memcpy(q.data() + c * W, all_q.data() + nn * sN + c * sC + h * sH, W);
      } else {
        const float* row = x + nn * sN + h * sH;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t c = 0; c < C; ++c)
            nan[chunk] |= level_indices(row + w * sW + c * sC, 1, 1, symmetric, n, clip,
                                        q.data() + (channels_contiguous ? w * C + c : c * W + w));
      }
      uint64_t* dst = out + ((nn * Hp + h + ph) * Wp + pw) * px;
      for (int64_t i = 0; i < P; ++i) {
        plane_signs(q.data(), W * C, static_cast<int>(i), plane.data());
        if (pack_row) {
          pack_row(plane.data(), W, channels_contiguous ? C : W, Cg, G, words.data());
        } else {
          pack_row_strided_reference(plane.data(), W, channels_contiguous ? C : 1, channels_contiguous ? 1 : W, Cg,
                                     G, words.data());
        }
        for (int64_t w = 0; w < W; ++w)
          std::memcpy(dst + w * px + i * G * Wg, words.data() + w * G * Wg, sizeof(uint64_t) * G * Wg);
      }
    }
  });
  return std::any_of(nan.begin(), nan.end(), [](uint8_t v) { return v != 0; });
}

void combine_planes(const int32_t* y, int64_t pixels, int64_t Pa, int64_t G, int64_t Pw, int64_t Cog,
                    const int32_t* coeff, const int32_t* offset, int32_t exact_divisor, float divisor,
                    const float* scale, const float* bias, float* out, int threads) {
  const int64_t Co = G * Cog, stacked = Pa * G * Pw * Cog;
  int shift = 0;
  while ((1 << shift) < exact_divisor) ++shift;
  if ((1 << shift) != exact_divisor) throw std::invalid_argument("combine_planes: the exact divisor must be 1, 2 or 4");
  const int chunks = static_cast<int>(std::min<int64_t>(pixels, 4 * std::max(threads, 1)));
  if (chunks == 0) return;
  parallel_chunks(std::max(1, std::min(threads, chunks)), chunks, [&](int chunk) {
    std::vector<int32_t> acc(static_cast<size_t>(Co));
    for (int64_t p = pixels * chunk / chunks; p < pixels * (chunk + 1) / chunks; ++p)
      combine_pixel(y + p * stacked, Pa, G, Pw, Cog, coeff, offset, shift, divisor, scale, bias, acc.data(),
                    out + p * Co);
  });
}

}  // namespace onebit
