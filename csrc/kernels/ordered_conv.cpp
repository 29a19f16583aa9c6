// The ordered 1x1 conv's driver: blocks of output channels of each image, on the pool's threads.
#include "kernels/ordered_conv.h"

#include <algorithm>

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

}  // namespace onebit
