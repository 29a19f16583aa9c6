// Binary (xnor-popcount) convolution on bit-packed activations and weights.
//
// Layouts (see pack.h for the one bit convention; every word is a uint64):
//   activations  x  [N, Hp, Wp, G, Wg]   Hp = H + 2 ph, Wp = W + 2 pw (already padded),
//                                        G = groups of the conv, Wg = ceil((C / G) / 64)
//   weights      w  [Co, KH, KW, Wg]     output channel co belongs to group co / (Co / G)
//   float / int32 output  [N, OH, OW, Co]  (channels last; logically [N, Co, OH, OW]; a float
//                                        output may also be NCHW: ConvOutput::out_nchw)
//   packed output         [N, OH + 2 oph, OW + 2 opw, OG, OWg]  OWg = ceil((Co / OG) / 64)
//
// The arithmetic: with Cg = C / G real channels per group and K = Cg * KH * KW,
//   acc = sum over taps and channels of sign(x) * sign(w) = K - 2 * popcount(x xor w)
// (the unused high bits are 0 in both operands, so they never count). Padded taps
// hold +1 bits (pad_value 0 or +1) or -1 bits (pad_value -1) in the packed input;
// for pad_value 0 a padded tap must contribute 0, not +sum(w), so every output
// position whose receptive field touches the padding subtracts the weight sums
// of those taps (an exact integer correction). Positions are grouped into border
// classes: all output rows with the same set of padded kernel rows share a row
// class, likewise columns; class 0 is the interior (no correction).
//
// Outputs: int32 acc; float32 acc * scale[c] + bias[c] (+ residual[n, oh, ow, c])
// computed as separate float32 roundings in that order (no FMA), so it equals
// torch's `acc.float() * scale + bias + residual` bit for bit (optionally with a
// BatchNorm y * bn_scale[c] + bn_shift[c] before the residual, as one fused multiply-add
// or two roundings: bn_fma); or a packed bit per channel: set (-1) iff acc < thr[c] when
// dir[c] = +1, iff acc > thr[c] when dir[c] = -1.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/isa.h"

namespace onebit {

class ActivationPacker;  // pack.h
class WeightCache;

enum class OutMode : int { int32 = 0, float32 = 1, threshold = 2 };

struct ConvGeometry {
  int64_t N = 0, H = 0, W = 0, Hp = 0, Wp = 0;
  int64_t C = 0, Co = 0, G = 1, Cg = 0, Cog = 0, Wg = 0;
  int64_t KH = 1, KW = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t OH = 0, OW = 0;
  int pad_value = 0;  // 0, +1 or -1
};

struct ConvOutput {
  OutMode mode = OutMode::int32;
  int32_t* out_i32 = nullptr;  // [N, OH, OW, Co]
  float* out_f32 = nullptr;    // [N, OH, OW, Co]
  const float* scale = nullptr;  // [Co] or null (1)
  const float* bias = nullptr;   // [Co] or null (0)
  // A BatchNorm after the conv (float32 output): y * bn_scale[c] + bn_shift[c], rounded once
  // (bn_fma, a fused multiply-add) or twice, as the torch build that runs the model does.
  const float* bn_scale = nullptr;  // [Co] or null (no BatchNorm)
  const float* bn_shift = nullptr;  // [Co], with bn_scale
  bool bn_fma = false;
  const float* residual = nullptr;  // [N, OH, OW, Co] or null: added last (float32 output)
  // Elements from one pixel to the next in out_i32 / out_f32 (ld) and in residual (residual_ld) as the
  // blocked kernels see them: Co, set by the driver, or the width of a worker's run buffer (NCHW memory)
  int64_t ld = 0, residual_ld = 0;
  // float32 output in NCHW memory, out_f32 [N, Co, OH, OW]: each run of pixels is written channels_last
  // into a small per-thread buffer, then transposed into place while it is in the caches
  bool out_nchw = false;
  // the residual in NCHW memory, [N, Co, OH, OW]: each run of pixels' share transposed into a per-thread
  // channels_last buffer before the kernel reads it
  bool residual_nchw = false;
  const int32_t* thr = nullptr;  // [Co]
  const int8_t* dir = nullptr;   // [Co], +1 or -1
  uint64_t* out_bits = nullptr;  // [N, OH + 2 oph, OW + 2 opw, OG, OWg]
  int64_t oph = 0, opw = 0, OG = 1, OCg = 0, OWg = 0;
  int out_pad_value = 0;
};

// Validates the numbers of a call; throws std::invalid_argument naming the problem.
// Fills in the derived fields (H, W, Cg, Cog, OH, OW, OCg, OWg). Output pointers are
// not looked at.
void validate_conv(ConvGeometry& g, ConvOutput& o, int64_t x_words_per_pixel, int64_t w_words);

// A validated convolution with everything that depends only on its shape computed
// once (border classes, tap offsets); run() may be called any number of times, from
// several threads at once. The ISA is read at each run.
class ConvPlan {
 public:
  // `params` carries the mode and the packed-output parameters; its pointers are ignored.
  ConvPlan(const ConvGeometry& g, const ConvOutput& params, int64_t x_words_per_pixel, int64_t w_words);
  // `out` carries the pointers (output, scale, bias, thresholds, directions) of this call.
  // With a cache, the weights prepared in the kernel's layout are kept for the next call
  // with the same weights (w and w_version, the caller's count of writes to them).
  void run(const uint64_t* x, const uint64_t* w, const ConvOutput& out, int threads, WeightCache* cache = nullptr,
           int64_t w_version = 0) const;
  // The same from the float input [N, C, H, W] (element strides sN, sC, sH, sW), packed
  // with the plan's padding, pad_value and groups inside the convolution's parallel
  // region: the threads pack their share of rows, meet, and convolve. One pass, one
  // wake-up of the threads, and the packed input stays in the caches.
  void run(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const uint64_t* w, const ConvOutput& out,
           int threads, WeightCache* cache = nullptr, int64_t w_version = 0) const;
  const ConvGeometry& geometry() const { return g_; }
  const ConvOutput& params() const { return o_; }
  // The register tile this plan runs with on ISA `isa` (an Isa value): a forced one
  // (set_tile, ONEBIT_TILE), else the one it chose at its first run there ("" before).
  std::string tile(int isa) const;
  // The kernel that writes this plan's float32 output in NCHW memory itself on ISA `isa` (with no
  // residual or an NCHW one), or "" where a tile's channels_last runs are transposed into place.
  std::string nchw_kernel(int isa) const;

 private:
  void run_impl(const uint64_t* x, const ActivationPacker* packer, const uint64_t* w, const ConvOutput& out,
                int threads, WeightCache* cache, int64_t w_version) const;
  uint64_t id_;  // unique per plan, for WeightCache
  ConvGeometry g_;
  ConvOutput o_;
  bool correct_ = false;
  std::vector<int32_t> row_class_, col_class_;
  std::vector<uint8_t> class_taps_;
  int32_t ncol_ = 1, nclasses_ = 1;
  std::vector<int64_t> step_off_;
  // Per ISA (index = Isa value): the index of the tile chosen by timing, -1 until the first run.
  mutable std::atomic<int> tile_[kIsaCount] = {-1, -1, -1, -1, -1, -1};
};

// The weights of one layer prepared in a kernel's layout (blocks of output channels,
// zero-padding corrections), kept between calls. An entry is valid for one plan, ISA,
// weight address and weight version: the caller keeps the weights alive while the
// cache lives and bumps the version whenever it writes to them. A few entries are
// kept (a layer called with several input shapes). Thread-safe.
class WeightCache {
 public:
  // Words of the packed weights read on every call (evenly spaced, the last one too):
  // writes that bypass the caller's version count (a raw pointer, a NumPy view) are
  // noticed when they change one of them (every write, for weights this small or smaller).
  static constexpr int64_t kProbeWords = 256;
  // The caller's version mixed with a fingerprint of the probed words of w[0 .. words).
  static int64_t state(const uint64_t* w, int64_t words, int64_t version);

  struct Entry {
    uint64_t plan = 0;
    int isa = 0;  // Isa value * 16 + tile index: the kernel whose layout `data` holds
    const uint64_t* w = nullptr;
    int64_t version = 0;
    size_t bytes = 0;
    void* data = nullptr;  // 64-byte aligned, owned
    Entry() = default;
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;
    ~Entry();
  };
  std::shared_ptr<const Entry> find(uint64_t plan, int isa, const uint64_t* w, int64_t version);
  void store(std::shared_ptr<const Entry> entry);
  size_t entries();

 private:
  static constexpr size_t kMaxEntries = 4;
  std::mutex mutex_;
  std::vector<std::shared_ptr<const Entry>> entries_;  // most recently used last
};

// One-shot convenience: validate, plan and run.
void binary_conv2d(ConvGeometry g, ConvOutput o, const uint64_t* x, const uint64_t* w, int64_t x_words_per_pixel,
                   int64_t w_words, int threads);

// ---- internals shared by the driver (conv.cpp) and the per-ISA kernels ----

// One unit of work: output channels [co0, co0 + nco) (inside one group, nco <= the
// kernel's block width) for the flattened output pixels [q0, q1), q = (n * OH + oh) * OW + ow.
struct ConvBlock {
  const ConvGeometry* g;
  const ConvOutput* o;
  const uint64_t* x;
  const uint64_t* w;
  int64_t co0, nco, q0, q1;
  const int64_t* step_off;   // [KH * KW * Wg] word offset of (tap, word) from a pixel's (0, 0) tap
  const int32_t* row_class;  // [OH] (null when there is no zero-padding correction)
  const int32_t* col_class;  // [OW]
  int32_t ncol_classes, nclasses;
  const uint8_t* class_taps;  // [nclasses, KH * KW]: 1 where the tap is padding
  bool bits_bytewise;         // threshold output: 8-channel groups land on whole bytes
  const uint64_t* x_prepared; // the kernel's prepare_input(x), or null
};

// A kernel works on a block in two steps: prepare() writes the block's weights in
// the kernel's layout plus its zero-padding corrections (block_bytes, 64-byte
// aligned), once per call; compute() then runs any range of pixels against them,
// possibly on several threads at once.
struct ConvKernel {
  const char* name;  // the register tile, "<pixels>x<channels>"; unique within its ISA
  int block_co;  // output channels per block (max)
  int tile_pix;  // output pixels per register tile (the driver's ranges of pixels start at multiples)
  size_t (*block_bytes)(const ConvGeometry& g, int nclasses);
  void (*prepare)(const ConvBlock& b, void* prepared);
  void (*compute)(const ConvBlock& b, const void* prepared);
  // Optional: a transformed copy of the whole packed input (input_factor words per input word),
  // made once per call and handed to every block as x_prepared: prepare_input(x, out, row0, row1, g)
  // transforms the padded rows [row0, row1) of x (row r = (n, hp), r = n * Hp + hp).
  int input_factor;
  void (*prepare_input)(const uint64_t* x, uint64_t* out, int64_t row0, int64_t row1, const ConvGeometry& g);
  // Writes a float32 output in NCHW memory itself (ConvOutput::out_nchw, and reads an NCHW residual):
  // the driver hands it the output, not a per-thread channels_last run to transpose.
  bool nchw_output = false;
};

// Every ISA's kernel in its register tiles, the default first (conv_tiles.h chooses).
const std::vector<ConvKernel>& conv_kernels_scalar();
const std::vector<ConvKernel>& conv_kernels_avx2();
const std::vector<ConvKernel>& conv_kernels_avx512();
const std::vector<ConvKernel>& conv_kernels_neon();
const std::vector<ConvKernel>& conv_kernels_neon_pairs();  // part of conv_kernels_neon()
// The AVX-512 kernel that writes a float32 NCHW output directly (8 output pixels per zmm), for a call
// it runs (out_nchw, stride 1, any residual in NCHW, output rows of whole 8-pixel groups, at most 16
// border classes); null otherwise.
const ConvKernel* conv_kernel_nchw_avx512(const ConvGeometry& g, const ConvOutput& o, int nclasses);

// The independent reference: plain loops, one output at a time, padding skipped tap by tap.
void binary_conv2d_reference(const ConvGeometry& g, const ConvOutput& o, const uint64_t* x, const uint64_t* w);

// Writes the padding border of a packed [N, H + 2 ph, W + 2 pw, G, Wg] tensor:
// all zero words for pad_value 0 / +1; the real channels' bits set for -1.
void fill_packed_border(uint64_t* out, int64_t N, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t G,
                        int64_t Cg, int pad_value);
// The word for one group of a -1 padded pixel: word k of ceil(Cg / 64).
inline uint64_t minus_one_word(int64_t Cg, int64_t k) {
  const int64_t left = Cg - 64 * k;
  return left >= 64 ? ~uint64_t{0} : ((uint64_t{1} << left) - 1);
}

}  // namespace onebit
