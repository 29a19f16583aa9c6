// Activation packing driver: picks the row kernel for the input's strides and the
// active ISA, fills the padding border, and splits big inputs over threads.
#include <stdexcept>
#include <string>

#include "kernels/conv.h"
#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/pack.h"
#include "kernels/parallel.h"

namespace onebit {
namespace {

// Packing is memory bound and cheap; waking another thread only pays off for big inputs.
constexpr int64_t kMinFloatsPerThread = int64_t{1} << 18;

std::string str(int64_t v) { return std::to_string(v); }

}  // namespace

ActivationPacker::ActivationPacker(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC,
                                   int64_t sH, int64_t sW, int64_t ph, int64_t pw, int pad_value, int64_t G,
                                   uint64_t* out)
    : x_(x), N_(N), C_(C), H_(H), W_(W), sN_(sN), sC_(sC), sH_(sH), sW_(sW), ph_(ph), pw_(pw), G_(G),
      pad_value_(pad_value), out_(out) {
  if (N < 0 || C < 1 || H < 0 || W < 0)
    throw std::invalid_argument("pack_activations: bad input shape [" + str(N) + ", " + str(C) + ", " + str(H) + ", " +
                                str(W) + "]");
  if (G < 1 || C % G) throw std::invalid_argument("pack_activations: groups=" + str(G) + " must divide C=" + str(C));
  if (ph < 0 || pw < 0) throw std::invalid_argument("pack_activations: padding must be >= 0");
  if (pad_value != 0 && pad_value != 1 && pad_value != -1)
    throw std::invalid_argument("pack_activations: pad_value must be 0, 1 or -1");
  if (sN < 0 || sC < 0 || sH < 0 || sW < 0) throw std::invalid_argument("pack_activations: negative strides");
  Cg_ = C / G;
  px_ = G * words_for(Cg_);
  Hp_ = H + 2 * ph;
  Wp_ = W + 2 * pw;
  // The stride of a dimension of size 1 is irrelevant: call it 1.
  if (C == 1) sC_ = 1;
  if (W == 1) sW_ = 1;
  const IsaKernels& kernels = isa_kernels(active_isa());
  if (sC_ == 1) {
    row_kernel_ = kernels.pack_row_cl, row_stride_ = sW_;
  } else if (sW_ == 1) {
    row_kernel_ = kernels.pack_row_nchw, row_stride_ = sC_;
  }
}

void ActivationPacker::border() const { fill_packed_border(out_, N_, H_, W_, ph_, pw_, G_, Cg_, pad_value_); }

void ActivationPacker::row(int64_t r) const {
  const int64_t n = r / H_, h = r % H_;
  const float* src = x_ + n * sN_ + h * sH_;
  uint64_t* dst = out_ + ((n * Hp_ + h + ph_) * Wp_ + pw_) * px_;
  if (row_kernel_) return row_kernel_(src, W_, row_stride_, Cg_, G_, dst);
  pack_row_strided_reference(src, W_, sW_, sC_, Cg_, G_, dst);
}

void pack_activations(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                      int64_t sW, int64_t ph, int64_t pw, int pad_value, int64_t G, uint64_t* out, int threads) {
  const ActivationPacker packer(x, N, C, H, W, sN, sC, sH, sW, ph, pw, pad_value, G, out);
  if (N == 0) return;
  packer.border();
  if (H == 0 || W == 0) return;
  parallel_tasks(threads, packer.rows(), N * C * H * W, kMinFloatsPerThread, 4, [&](int64_t r) { packer.row(r); });
}

}  // namespace onebit
