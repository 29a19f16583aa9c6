// The depthwise 1x1 conv's loops vectorized for AVX2 + FMA (also what an AVX-512 CPU runs: the loops are
// bound by memory, not by the vector width).
#include "kernels/channel_affine.h"
#include "kernels/channel_affine_rows.h"

namespace onebit {

void channel_affine_rows_avx2(const ChannelAffine& a, int64_t r0, int64_t r1) { channel_affine_rows(a, r0, r1); }

}  // namespace onebit
