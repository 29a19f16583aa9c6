// The depthwise 1x1 conv's driver and its portable loops (channel_affine.h).
#include "kernels/channel_affine.h"

#include "kernels/channel_affine_rows.h"
#include "kernels/dispatch.h"
#include "kernels/parallel.h"

namespace onebit {
namespace {

// Below this many values per thread, waking a thread costs more than it saves.
constexpr int64_t kMinValuesPerThread = int64_t{1} << 15;

}  // namespace

void channel_affine_rows_portable(const ChannelAffine& a, int64_t r0, int64_t r1) { channel_affine_rows(a, r0, r1); }

void channel_affine(const ChannelAffine& a, int64_t N, int threads) {
  if (N <= 0 || a.C <= 0 || a.HW <= 0) return;
  ChannelAffineRows rows = isa_kernels(active_isa()).channel_affine;
  if (rows == nullptr) rows = channel_affine_rows_portable;
  const int64_t nrows = a.channels_last ? N * a.HW : N * a.C, row = a.channels_last ? a.C : a.HW;
  // tasks of whole rows, about 4096 values each
  const int64_t per_task = row >= 4096 ? 1 : 4096 / row, tasks = (nrows + per_task - 1) / per_task;
  parallel_tasks(threads, tasks, nrows * row, kMinValuesPerThread, 4, [&](int64_t t) {
    const int64_t r0 = t * per_task, r1 = r0 + per_task < nrows ? r0 + per_task : nrows;
    rows(a, r0, r1);
  });
}

}  // namespace onebit
