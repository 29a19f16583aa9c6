// The ordered convs' drivers: blocks of output channels of each image (1x1), or rows of each image (the stem's
// tap-ordered conv, after a zero-padded copy of its input), on the pool's threads.
#include "kernels/ordered_conv.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/parallel.h"

namespace onebit {

namespace {
// Below this many multiply-adds per thread another thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 16;
}  // namespace

void ordered_conv1x1(const float* x, int64_t N, int64_t C, int64_t HW, const float* wt, int64_t ld, int64_t Co,
                     const float* bias, float* out, int threads) {
  if (N <= 0 || Co <= 0 || HW <= 0) return;
  OrderedConvChannels kernel = isa_kernels(active_isa()).ordered_conv;
  if (kernel == nullptr) kernel = ordered_conv_channels_reference;
  const int64_t blocks = (Co + kOrderedConvBlock - 1) / kOrderedConvBlock;
  parallel_tasks(threads, N * blocks, N * Co * C * HW, kMinWorkPerThread, 4, [&](int64_t task) {
    const int64_t n = task / blocks, b = task % blocks;
    const int64_t co0 = b * kOrderedConvBlock, co1 = std::min(Co, co0 + kOrderedConvBlock);
    kernel(x + n * C * HW, C, HW, wt, ld, bias, out + n * Co * HW, co0, co1);
  });
}

void tap_ordered_conv(const float* x, const float* wt, int64_t ld, float* out, const TapConvGeometry& g, int threads) {
  if (g.N <= 0 || g.OH <= 0 || g.OW <= 0 || g.Co <= 0) return;
  TapConvRows rows = isa_kernels(active_isa()).tap_conv;
  if (rows == nullptr) rows = tap_conv_rows_reference;
  // the input zero padded, [N, C, Hp, Wp], in the calling thread's buffer (kept between calls)
  const int64_t Hp = g.H + 2 * g.PH, Wp = g.W + 2 * g.PW, image = g.C * Hp * Wp;
  thread_local std::vector<float> padded;
  if (padded.size() < static_cast<size_t>(g.N * image)) padded.resize(static_cast<size_t>(g.N * image));
  float* xp = padded.data();
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t c = 0; c < g.C; ++c) {
      float* plane = xp + n * image + c * Hp * Wp;
      std::fill(plane, plane + g.PH * Wp, 0.0f);  // the rows above and below
      std::fill(plane + (g.PH + g.H) * Wp, plane + Hp * Wp, 0.0f);
      for (int64_t h = 0; h < g.H; ++h) {
        const float* src = x + n * g.sN + c * g.sC + h * g.sH;
        float* dst = plane + (h + g.PH) * Wp;
        std::fill(dst, dst + g.PW, 0.0f);
        std::fill(dst + g.PW + g.W, dst + Wp, 0.0f);
        dst += g.PW;
        if (g.sW == 1) {
          std::memcpy(dst, src, static_cast<size_t>(g.W) * sizeof(float));
        } else {
          for (int64_t w = 0; w < g.W; ++w) dst[w] = src[w * g.sW];
        }
      }
    }
  constexpr int64_t kRowsPerTask = 2;
  const int64_t chunks = (g.OH + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t macs = g.N * g.OH * g.OW * g.Co * g.KH * g.KW * g.C;
  parallel_tasks(threads, g.N * chunks, macs, kMinWorkPerThread, 4, [&](int64_t task) {
    const int64_t n = task / chunks, r = task % chunks;
    const int64_t oh0 = r * kRowsPerTask, oh1 = std::min(g.OH, oh0 + kRowsPerTask);
    rows(xp + n * image, wt, ld, out + n * g.OH * g.OW * g.Co, g, oh0, oh1);
  });
}

}  // namespace onebit
