// The convolution driver: validation, border classes, work partition, threads.
// Portable code; the per-ISA kernels only see one ConvBlock at a time.
#include "kernels/conv.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/conv_tiles.h"
#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/pack.h"
#include "kernels/parallel.h"

namespace onebit {
namespace {

[[noreturn]] void fail(const std::string& message) { throw std::invalid_argument(message); }

std::string str(int64_t v) { return std::to_string(v); }

// Below this many word xor-popcounts per thread, another thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 17;
// Work chunks per thread region: more balance against a late thread, more claims.
constexpr int64_t kChunksPerThread = 8;

// A growable, reused, 64-byte aligned buffer.
struct Scratch {
  void* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
  void* get(size_t bytes) {
    if (bytes > size) {
      std::free(data);
      size = (bytes + 4095) / 4096 * 4096;
      data = std::aligned_alloc(64, size);
      if (!data) throw std::bad_alloc();
    }
    return data;
  }
};
// The calling thread's per-call buffers, read by all the workers of its call.
thread_local Scratch tls_packed;  // the packed float input (fused packing)
thread_local Scratch tls_input;   // prepared input
thread_local Scratch tls_blocks;  // prepared weight blocks
thread_local Scratch tls_nhwc;    // a worker's run of output pixels, channels_last (NCHW outputs)
thread_local Scratch tls_shortcut;  // a worker's run of the residual, channels_last (NCHW residuals)

// Output pixels per run of an NCHW output or residual (rounded up to whole register tiles and transpose
// blocks): transposed between NCHW memory and a worker's channels_last buffer while in the L1 cache.
constexpr int64_t kNchwRunPixels = 64;

// The block's pixels [q0, q1) with an NCHW float output or residual, a run at a time. An NCHW residual's
// [block channels, pixels] share is transposed into the worker's buffer (its pointer offset so that pixel q
// reads the buffer's row q - r0); the kernel writes an NCHW output's run into another buffer likewise, then
// the run's [pixels, block channels] is transposed into each image's [channels, OH * OW] plane. A buffer row
// holds the block's channels only (whole 16-float lines): rows Co floats apart would put a 256-channel
// block's rows in a few L1 sets, evicting each other.
void compute_nchw(const ConvKernel& kernel, const ConvBlock& b, const void* prepared, TransposeBlock transpose) {
  const ConvGeometry& g = *b.g;
  // a run: whole register tiles and whole 16-pixel rows of the transpose's 16 x 16 blocks
  const int64_t unit = std::lcm<int64_t>(kernel.tile_pix, 16), hw = g.OH * g.OW;
  const int64_t run = (kNchwRunPixels + unit - 1) / unit * unit;
  const int64_t ld = (b.nco + 15) / 16 * 16;
  const size_t bytes = static_cast<size_t>(run * ld) * sizeof(float);
  float* out_run = b.o->out_nchw ? static_cast<float*>(tls_nhwc.get(bytes)) : nullptr;
  float* shortcut_run = b.o->residual_nchw ? static_cast<float*>(tls_shortcut.get(bytes)) : nullptr;
  ConvOutput o = *b.o;
  if (out_run) o.ld = ld;
  if (shortcut_run) o.residual_ld = ld;
  ConvBlock r = b;
  r.o = &o;
  for (int64_t r0 = b.q0; r0 < b.q1; r0 += run) {
    r.q0 = r0;
    r.q1 = std::min(b.q1, r0 + run);
    if (shortcut_run) {
      for (int64_t q = r.q0; q < r.q1;) {  // the run's pixels of each image
        const int64_t n = q / hw, end = std::min(r.q1, (n + 1) * hw);
        transpose(reinterpret_cast<const uint32_t*>(b.o->residual + (n * g.Co + b.co0) * hw + (q - n * hw)), b.nco,
                  end - q, hw, reinterpret_cast<uint32_t*>(shortcut_run + (q - r0) * ld), ld);
        q = end;
      }
      o.residual = shortcut_run - r0 * ld - b.co0;
    }
    if (out_run) o.out_f32 = out_run - r0 * ld - b.co0;
    kernel.compute(r, prepared);
    if (!out_run) continue;
    for (int64_t q = r.q0; q < r.q1;) {
      const int64_t n = q / hw, end = std::min(r.q1, (n + 1) * hw);
      transpose(reinterpret_cast<const uint32_t*>(out_run + (q - r0) * ld), end - q, b.nco, ld,
                reinterpret_cast<uint32_t*>(b.o->out_f32 + (n * g.Co + b.co0) * hw + (q - n * hw)), hw);
      q = end;
    }
  }
}

// Row (or column) classes: for every output row, the set of kernel rows that fall in
// the padding. Class 0 is always the empty set.
void border_classes(int64_t out, int64_t k, int64_t stride, int64_t dil, int64_t pad, int64_t in,
                    std::vector<int32_t>& cls, std::vector<std::vector<uint8_t>>& sets) {
  sets.assign(1, std::vector<uint8_t>(k, 0));
  std::map<std::vector<uint8_t>, int32_t> index{{sets[0], 0}};
  cls.assign(out, 0);
  std::vector<uint8_t> set(k);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t t = 0; t < k; ++t) {
      const int64_t i = o * stride + t * dil;  // padded coordinate
      set[t] = (i < pad || i >= pad + in) ? 1 : 0;
    }
    auto it = index.find(set);
    if (it == index.end()) {
      it = index.emplace(set, static_cast<int32_t>(sets.size())).first;
      sets.push_back(set);
    }
    cls[o] = it->second;
  }
}

}  // namespace

void validate_conv(ConvGeometry& g, ConvOutput& o, int64_t x_words_per_pixel, int64_t w_words) {
  if (g.N < 0) fail("binary_conv2d: negative batch size");
  if (g.C < 1 || g.Co < 1) fail("binary_conv2d: in_channels and out_channels must be >= 1");
  if (g.G < 1 || g.C % g.G || g.Co % g.G)
    fail("binary_conv2d: groups=" + str(g.G) + " must divide in_channels=" + str(g.C) + " and out_channels=" +
         str(g.Co));
  if (g.KH < 1 || g.KW < 1) fail("binary_conv2d: kernel_size must be >= 1");
  if (g.sh < 1 || g.sw < 1) fail("binary_conv2d: stride must be >= 1");
  if (g.dh < 1 || g.dw < 1) fail("binary_conv2d: dilation must be >= 1");
  if (g.ph < 0 || g.pw < 0) fail("binary_conv2d: padding must be >= 0");
  if (g.pad_value != 0 && g.pad_value != 1 && g.pad_value != -1) fail("binary_conv2d: pad_value must be 0, 1 or -1");
  g.Cg = g.C / g.G;
  g.Cog = g.Co / g.G;
  if (g.Wg != words_for(g.Cg))
    fail("binary_conv2d: packed input has " + str(g.Wg) + " words per group, expected ceil((" + str(g.C) + "/" +
         str(g.G) + ")/64) = " + str(words_for(g.Cg)));
  if (x_words_per_pixel != g.G * g.Wg)
    fail("binary_conv2d: packed input has " + str(x_words_per_pixel) + " words per pixel, expected groups * words = " +
         str(g.G * g.Wg));
  if (w_words != g.Wg)
    fail("binary_conv2d: packed weights have " + str(w_words) + " words per tap, expected " + str(g.Wg));
  g.H = g.Hp - 2 * g.ph;
  g.W = g.Wp - 2 * g.pw;
  if (g.H < 1 || g.W < 1)
    fail("binary_conv2d: packed input of spatial size " + str(g.Hp) + "x" + str(g.Wp) + " is smaller than its padding " +
         str(g.ph) + "x" + str(g.pw) + " on both sides");
  const int64_t eh = g.dh * (g.KH - 1) + 1, ew = g.dw * (g.KW - 1) + 1;
  if (eh > g.Hp || ew > g.Wp)
    fail("binary_conv2d: the dilated kernel (" + str(eh) + "x" + str(ew) + ") is larger than the padded input (" +
         str(g.Hp) + "x" + str(g.Wp) + ")");
  g.OH = (g.Hp - eh) / g.sh + 1;
  g.OW = (g.Wp - ew) / g.sw + 1;
  if (o.mode == OutMode::threshold) {
    if (o.OG < 1 || g.Co % o.OG) fail("binary_conv2d: out_groups=" + str(o.OG) + " must divide out_channels=" + str(g.Co));
    if (o.oph < 0 || o.opw < 0) fail("binary_conv2d: out_padding must be >= 0");
    if (o.out_pad_value != 0 && o.out_pad_value != 1 && o.out_pad_value != -1)
      fail("binary_conv2d: out_pad_value must be 0, 1 or -1");
    o.OCg = g.Co / o.OG;
    o.OWg = words_for(o.OCg);
  } else if (o.mode != OutMode::int32 && o.mode != OutMode::float32) {
    fail("binary_conv2d: unknown output mode");
  }
  // Integer results must fit in int32 and convert exactly to float32.
  if (g.Cg * g.KH * g.KW > (int64_t{1} << 24))
    fail("binary_conv2d: in_channels/groups * KH * KW must be <= 2^24 for exact results");
}

void fill_packed_border(uint64_t* out, int64_t N, int64_t H, int64_t W, int64_t ph, int64_t pw, int64_t G,
                        int64_t Cg, int pad_value) {
  if (ph == 0 && pw == 0) return;
  const int64_t Wg = words_for(Cg), Hp = H + 2 * ph, Wp = W + 2 * pw, px = G * Wg;
  std::vector<uint64_t> pattern(px, 0);
  if (pad_value < 0)
    for (int64_t gi = 0; gi < G; ++gi)
      for (int64_t k = 0; k < Wg; ++k) pattern[gi * Wg + k] = minus_one_word(Cg, k);
  auto fill = [&](uint64_t* dst, int64_t pixels) {
    if (pad_value >= 0) {
      std::memset(dst, 0, static_cast<size_t>(pixels * px) * sizeof(uint64_t));
    } else {
      for (int64_t i = 0; i < pixels; ++i) std::memcpy(dst + i * px, pattern.data(), px * sizeof(uint64_t));
    }
  };
  for (int64_t n = 0; n < N; ++n) {
    uint64_t* img = out + n * Hp * Wp * px;
    fill(img, ph * Wp);
    fill(img + (ph + H) * Wp * px, ph * Wp);
    for (int64_t h = ph; h < ph + H; ++h) {
      fill(img + h * Wp * px, pw);
      fill(img + (h * Wp + pw + W) * px, pw);
    }
  }
}

WeightCache::Entry::~Entry() { std::free(data); }

int64_t WeightCache::state(const uint64_t* w, int64_t words, int64_t version) {
  // A multiply-xorshift mix of every probed word, so a change of any probed bit changes the state.
  uint64_t h = static_cast<uint64_t>(version) * 0x9e3779b97f4a7c15ULL;
  auto mix = [&h](uint64_t v) {
    h = (h ^ v) * 0xff51afd7ed558ccdULL;
    h ^= h >> 32;
  };
  if (words > 0) {
    const int64_t step = (words + kProbeWords - 1) / kProbeWords;
    for (int64_t i = 0; i < words; i += step) mix(w[i]);
    mix(w[words - 1]);
  }
  return static_cast<int64_t>(h);
}

std::shared_ptr<const WeightCache::Entry> WeightCache::find(uint64_t plan, int isa, const uint64_t* w,
                                                           int64_t version) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = entries_.size(); i-- > 0;) {
    const auto& e = entries_[i];
    if (e->plan == plan && e->isa == isa && e->w == w && e->version == version) {
      std::shared_ptr<const Entry> found = e;
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
      entries_.push_back(found);
      return found;
    }
  }
  return nullptr;
}

void WeightCache::store(std::shared_ptr<const Entry> entry) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t i = 0; i < entries_.size(); ++i) {
    const auto& e = entries_[i];
    // An entry for the same plan and ISA with other weights or an older version is stale.
    if (e->plan == entry->plan && e->isa == entry->isa) {
      entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  }
  if (entries_.size() >= kMaxEntries) entries_.erase(entries_.begin());
  entries_.push_back(std::move(entry));
}

size_t WeightCache::entries() {
  std::lock_guard<std::mutex> lock(mutex_);
  return entries_.size();
}

namespace {
std::atomic<uint64_t> next_plan_id{1};
}  // namespace

ConvPlan::ConvPlan(const ConvGeometry& geometry, const ConvOutput& params, int64_t x_words_per_pixel, int64_t w_words)
    : g_(geometry), o_(params), id_(next_plan_id.fetch_add(1, std::memory_order_relaxed)) {
  validate_conv(g_, o_, x_words_per_pixel, w_words);
  const ConvGeometry& g = g_;
  // Border classes for the zero-padding correction.
  correct_ = g.pad_value == 0 && (g.ph > 0 || g.pw > 0);
  if (correct_) {
    std::vector<std::vector<uint8_t>> row_sets, col_sets;
    border_classes(g.OH, g.KH, g.sh, g.dh, g.ph, g.H, row_class_, row_sets);
    border_classes(g.OW, g.KW, g.sw, g.dw, g.pw, g.W, col_class_, col_sets);
    const int32_t nrow = static_cast<int32_t>(row_sets.size());
    ncol_ = static_cast<int32_t>(col_sets.size());
    nclasses_ = nrow * ncol_;
    const int64_t taps = g.KH * g.KW;
    class_taps_.assign(static_cast<size_t>(nclasses_) * taps, 0);
    for (int32_t r = 0; r < nrow; ++r)
      for (int32_t c = 0; c < ncol_; ++c)
        for (int64_t kh = 0; kh < g.KH; ++kh)
          for (int64_t kw = 0; kw < g.KW; ++kw)
            class_taps_[(r * ncol_ + c) * taps + kh * g.KW + kw] = row_sets[r][kh] | col_sets[c][kw];
  }
  // Word offsets of every (tap, word) step from a pixel's (0, 0) tap.
  const int64_t px = g.G * g.Wg;
  step_off_.resize(g.KH * g.KW * g.Wg);
  for (int64_t kh = 0; kh < g.KH; ++kh)
    for (int64_t kw = 0; kw < g.KW; ++kw)
      for (int64_t k = 0; k < g.Wg; ++k)
        step_off_[(kh * g.KW + kw) * g.Wg + k] = (kh * g.dh * g.Wp + kw * g.dw) * px + k;
}

std::string ConvPlan::tile(int isa) const {
  const auto* tiles = conv_tiles(static_cast<Isa>(isa));
  if (!tiles || isa < 0 || isa >= kIsaCount) return "";
  const std::string forced = forced_tile(isa_name(static_cast<Isa>(isa)));
  if (forced != "auto") return forced;
  const int chosen = tile_[isa].load(std::memory_order_relaxed);
  return chosen < 0 ? "" : (*tiles)[chosen].name;
}

std::string ConvPlan::nchw_kernel(int isa) const {
  if (isa < 0 || isa >= kIsaCount) return "";
  const auto nchw = isa_kernels(static_cast<Isa>(isa)).conv_nchw;
  ConvOutput o = o_;
  o.out_nchw = true;
  const ConvKernel* k = nchw ? nchw(g_, o, nclasses_) : nullptr;
  return k ? k->name : "";
}

void binary_conv2d(ConvGeometry g, ConvOutput o, const uint64_t* x, const uint64_t* w, int64_t x_words_per_pixel,
                   int64_t w_words, int threads) {
  ConvPlan(g, o, x_words_per_pixel, w_words).run(x, w, o, threads);
}

void ConvPlan::run(const uint64_t* x, const uint64_t* w, const ConvOutput& ptrs, int threads, WeightCache* cache,
                   int64_t w_version) const {
  run_impl(x, nullptr, w, ptrs, threads, cache, w_version);
}

void ConvPlan::run(const float* x, int64_t sN, int64_t sC, int64_t sH, int64_t sW, const uint64_t* w,
                   const ConvOutput& ptrs, int threads, WeightCache* cache, int64_t w_version) const {
  const ConvGeometry& g = g_;
  if (!x) fail("binary_conv2d: null input");
  const int64_t words = g.N * g.Hp * g.Wp * g.G * g.Wg;
  uint64_t* packed = static_cast<uint64_t*>(tls_packed.get(std::max<int64_t>(words, 1) * sizeof(uint64_t)));
  const ActivationPacker packer(x, g.N, g.C, g.H, g.W, sN, sC, sH, sW, g.ph, g.pw, g.pad_value, g.G, packed);
  run_impl(packed, &packer, w, ptrs, threads, cache, w_version);
}

void ConvPlan::run_impl(const uint64_t* x, const ActivationPacker* packer, const uint64_t* w, const ConvOutput& ptrs,
                        int threads, WeightCache* cache, int64_t w_version) const {
  const ConvGeometry& g = g_;
  ConvOutput o = o_;
  o.out_i32 = ptrs.out_i32;
  o.out_f32 = ptrs.out_f32;
  o.out_bits = ptrs.out_bits;
  o.scale = ptrs.scale;
  o.bias = ptrs.bias;
  o.residual = ptrs.residual;
  o.bn_scale = ptrs.bn_scale;
  o.bn_shift = ptrs.bn_shift;
  o.bn_fma = ptrs.bn_fma;
  o.thr = ptrs.thr;
  o.dir = ptrs.dir;
  o.out_nchw = ptrs.out_nchw;
  o.residual_nchw = ptrs.residual_nchw && ptrs.residual;
  o.ld = o.residual_ld = g.Co;
  if (!x || !w) fail("binary_conv2d: null input");
  if (o.out_nchw && o.mode != OutMode::float32) fail("binary_conv2d: an NCHW output must be float32");
  switch (o.mode) {
    case OutMode::int32:
      if (!o.out_i32) fail("binary_conv2d: missing int32 output");
      break;
    case OutMode::float32:
      if (!o.out_f32) fail("binary_conv2d: missing float32 output");
      break;
    case OutMode::threshold:
      if (!o.out_bits) fail("binary_conv2d: missing packed output");
      if (!o.thr || !o.dir) fail("binary_conv2d: thresholds and directions are required");
      for (int64_t c = 0; c < g.Co; ++c)
        if (o.dir[c] != 1 && o.dir[c] != -1)
          fail("binary_conv2d: direction[" + str(c) + "] = " + str(o.dir[c]) + ", expected +1 or -1");
      break;
  }
  const Isa isa = active_isa();
  if (g.N == 0) return;
  if (o.mode == OutMode::threshold) {
    const int64_t ohp = g.OH + 2 * o.oph, owp = g.OW + 2 * o.opw;
    std::memset(o.out_bits, 0, static_cast<size_t>(g.N * ohp * owp * o.OG * o.OWg) * sizeof(uint64_t));
    if (o.out_pad_value < 0) fill_packed_border(o.out_bits, g.N, g.OH, g.OW, o.oph, o.opw, o.OG, o.OCg, -1);
  }
  const std::vector<ConvKernel>* tiles = conv_tiles(isa);
  if (packer) packer->border();
  if (!tiles) {
    if (packer)
      for (int64_t r = 0; r < packer->rows(); ++r) packer->row(r);
    const int64_t hw = g.OH * g.OW, values = g.N * hw * g.Co;
    std::vector<float> shortcut, nhwc;  // channels_last copies of an NCHW residual and output
    ConvOutput cl = o;
    if (o.residual_nchw) {
      shortcut.resize(static_cast<size_t>(values));
      for (int64_t n = 0; n < g.N; ++n)
        transpose_block_reference(reinterpret_cast<const uint32_t*>(o.residual + n * g.Co * hw), g.Co, hw, hw,
                                  reinterpret_cast<uint32_t*>(shortcut.data() + n * hw * g.Co), g.Co);
      cl.residual = shortcut.data();
    }
    if (o.out_nchw) {
      nhwc.resize(static_cast<size_t>(values));
      cl.out_f32 = nhwc.data();
    }
    binary_conv2d_reference(g, cl, x, w);
    if (o.out_nchw)
      for (int64_t n = 0; n < g.N; ++n)
        transpose_block_reference(reinterpret_cast<const uint32_t*>(nhwc.data() + n * hw * g.Co), hw, g.Co, g.Co,
                                  reinterpret_cast<uint32_t*>(o.out_f32 + n * g.Co * hw), hw);
    return;
  }
  const bool correct = correct_;
  const int32_t nclasses = nclasses_;
  const int64_t steps = g.KH * g.KW * g.Wg;

  ConvBlock proto{};
  proto.g = &g;
  proto.o = &o;
  proto.x = x;
  proto.w = w;
  proto.step_off = step_off_.data();
  proto.row_class = correct ? row_class_.data() : nullptr;
  proto.col_class = correct ? col_class_.data() : nullptr;
  proto.ncol_classes = ncol_;
  proto.nclasses = nclasses;
  proto.class_taps = correct ? class_taps_.data() : nullptr;
  proto.x_prepared = nullptr;
  TransposeBlock transpose = isa_kernels(isa).transpose_block;
  if (transpose == nullptr) transpose = transpose_block_reference;
  // A float32 NCHW output written by a kernel made for it, where the ISA has one that runs the call (its
  // weight cache entries its own: index 15); else the register tile, forced or timed on this shape at the
  // plan's first run (conv_tiles.h).
  const auto nchw = isa_kernels(isa).conv_nchw;
  const ConvKernel* kernel = o.out_nchw && nchw ? nchw(g, o, nclasses) : nullptr;
  int tile_index = 15;
  if (!kernel) {
    tile_index = choose_tile(isa, proto, tile_[static_cast<int>(isa)]);
    kernel = &(*tiles)[tile_index];
  }

  // Blocks of output channels, never straddling a group.
  struct Range {
    int64_t co0, nco;
  };
  std::vector<Range> blocks;
  for (int64_t gi = 0; gi < g.G; ++gi)
    for (int64_t c = 0; c < g.Cog; c += kernel->block_co)
      blocks.push_back({gi * g.Cog + c, std::min<int64_t>(kernel->block_co, g.Cog - c)});
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  const int64_t Q = g.N * g.OH * g.OW, P = kernel->tile_pix;
  const int64_t ntiles = (Q + P - 1) / P;

  const bool bytewise = o.mode == OutMode::threshold && kernel->block_co % 8 == 0 && g.Cog % 8 == 0 && o.OCg % 8 == 0;
  // Threshold outputs whose channel blocks share bytes keep each pixel on one thread.
  const bool pixel_major = o.mode == OutMode::threshold && !bytewise;

  const int64_t work = Q * g.Co * steps;
  int64_t nthreads = std::min<int64_t>(std::max(threads, 1), std::max<int64_t>(1, work / kMinWorkPerThread));
  nthreads = std::min<int64_t>(nthreads, pixel_major ? ntiles : nblocks * ntiles);
  nthreads = std::min<int64_t>(nthreads, 256);

  proto.bits_bytewise = bytewise;

  // The input phase, one padded row (n, hp) at a time: packing of the float input
  // (fused calls) and the kernel's own transform of the packed input, if it has one.
  const int64_t row_words = g.Wp * g.G * g.Wg, in_rows = g.N * g.Hp;
  uint64_t* x_prepared = nullptr;
  if (kernel->prepare_input) {
    x_prepared = static_cast<uint64_t*>(tls_input.get(in_rows * row_words * kernel->input_factor * sizeof(uint64_t)));
    proto.x_prepared = x_prepared;
  }
  const bool input_phase = packer || x_prepared;
  auto input_rows = [&](int64_t r0, int64_t r1) {
    if (packer)
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / g.Hp, hp = r % g.Hp;
        if (hp >= g.ph && hp < g.ph + g.H) packer->row(n * g.H + hp - g.ph);
      }
    if (x_prepared) kernel->prepare_input(x, x_prepared, r0, r1, g);
  };

  // Every block's weights are prepared once, by whichever thread first needs them
  // (the others wait for it), into a buffer shared by the threads of this call; or
  // they come ready from the cache, or go into a new cache entry.
  const size_t block_bytes = (kernel->block_bytes(g, nclasses) + 63) / 64 * 64;
  const int isa_code = static_cast<int>(isa) * 16 + tile_index;
  if (cache) w_version = WeightCache::state(w, g.Co * g.KH * g.KW * g.Wg, w_version);
  std::shared_ptr<const WeightCache::Entry> cached = cache ? cache->find(id_, isa_code, w, w_version) : nullptr;
  std::shared_ptr<WeightCache::Entry> fresh;
  char* prepared;
  if (cached) {
    prepared = static_cast<char*>(cached->data);
  } else if (cache) {
    fresh = std::make_shared<WeightCache::Entry>();
    fresh->plan = id_;
    fresh->isa = isa_code;
    fresh->w = w;
    fresh->version = w_version;
    fresh->bytes = block_bytes * nblocks;
    fresh->data = std::aligned_alloc(64, std::max<size_t>(64, fresh->bytes));
    if (!fresh->data) throw std::bad_alloc();
    prepared = static_cast<char*>(fresh->data);
  } else {
    prepared = static_cast<char*>(tls_blocks.get(block_bytes * nblocks));
  }
  std::unique_ptr<std::atomic<int>[]> state(new std::atomic<int>[nblocks]);  // 0 todo, 1 busy, 2 ready
  for (int64_t bi = 0; bi < nblocks; ++bi) state[bi].store(cached ? 2 : 0, std::memory_order_relaxed);
  auto block = [&](int64_t bi) {
    ConvBlock b = proto;
    b.co0 = blocks[bi].co0;
    b.nco = blocks[bi].nco;
    return b;
  };
  auto ready = [&](int64_t bi) -> const void* {
    void* data = prepared + bi * block_bytes;
    if (state[bi].load(std::memory_order_acquire) == 2) return data;
    int todo = 0;
    if (state[bi].compare_exchange_strong(todo, 1, std::memory_order_acq_rel)) {
      kernel->prepare(block(bi), data);
      state[bi].store(2, std::memory_order_release);
      return data;
    }
    for (int spins = 0; state[bi].load(std::memory_order_acquire) != 2; ++spins) {
      if (spins < 4096) cpu_relax();
      else std::this_thread::yield();  // its preparer may have been preempted
    }
    return data;
  };

  // Work items are (block, tile) pairs in block-major order (a thread sweeps the
  // pixels against one block's weights, hot in L1), or tiles alone when every pixel
  // must stay on one thread. Threads claim small chunks of items dynamically.
  const int64_t items = pixel_major ? ntiles : nblocks * ntiles;
  auto run_items = [&](int64_t i0, int64_t i1) {
    auto run = [&](int64_t bi, int64_t tile0, int64_t tile1) {
      ConvBlock b = block(bi);
      b.q0 = tile0 * P;
      b.q1 = std::min(tile1 * P, Q);
      if (b.q0 >= b.q1) return;
      if ((o.out_nchw || o.residual_nchw) && !kernel->nchw_output) {
        compute_nchw(*kernel, b, ready(bi), transpose);
      } else {
        kernel->compute(b, ready(bi));
      }
    };
    if (pixel_major) {
      for (int64_t bi = 0; bi < nblocks; ++bi) run(bi, i0, i1);
      return;
    }
    for (int64_t i = i0; i < i1;) {
      const int64_t bi = i / ntiles, tile0 = i % ntiles;
      const int64_t tile1 = std::min(ntiles, tile0 + (i1 - i));
      run(bi, tile0, tile1);
      i += tile1 - tile0;
    }
  };
  auto run_parallel = [&](int64_t T) {
    // Each thread owns a contiguous region of items (its own blocks, prepared by itself:
    // the weights stay in its caches) cut into a few chunks; when its region is done it
    // takes the remaining chunks of the others, so a thread that starts late or runs
    // slowly does not hold the call up.
    const int64_t per_region = std::max<int64_t>(1, std::min<int64_t>(kChunksPerThread, items / T));
    std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[T]);
    for (int64_t t = 0; t < T; ++t) next[t].store(0, std::memory_order_relaxed);
    // The input phase comes first, in chunks of rows claimed by whichever thread is
    // free; a thread out of chunks waits only for chunks already claimed (so running
    // threads), never for a thread that has not started.
    const int64_t in_chunks = input_phase ? std::min<int64_t>(in_rows, 4 * T) : 0;
    std::atomic<int64_t> in_next{0}, in_done{0};
    parallel_chunks(static_cast<int>(T), static_cast<int>(T), [&](int t) {
      if (in_chunks) {
        for (int64_t c = in_next.fetch_add(1, std::memory_order_relaxed); c < in_chunks;
             c = in_next.fetch_add(1, std::memory_order_relaxed)) {
          input_rows(in_rows * c / in_chunks, in_rows * (c + 1) / in_chunks);
          in_done.fetch_add(1, std::memory_order_acq_rel);
        }
        for (int spins = 0; in_done.load(std::memory_order_acquire) < in_chunks; ++spins) {
          if (spins < 4096) cpu_relax();
          else std::this_thread::yield();
        }
      }
      for (int64_t k = 0; k < T; ++k) {
        const int64_t r = (t + k) % T;
        const int64_t r0 = items * r / T, r1 = items * (r + 1) / T;
        for (int64_t c = next[r].fetch_add(1, std::memory_order_relaxed); c < per_region;
             c = next[r].fetch_add(1, std::memory_order_relaxed))
          run_items(r0 + (r1 - r0) * c / per_region, r0 + (r1 - r0) * (c + 1) / per_region);
      }
    });
  };
  if (nthreads <= 1) {
    if (input_phase) input_rows(0, in_rows);
    run_items(0, items);
  } else {
    run_parallel(nthreads);
  }
  if (fresh) {  // every block is prepared by now (each call covers them all): keep them
    for (int64_t bi = 0; bi < nblocks; ++bi) ready(bi);
    cache->store(std::move(fresh));
  }
}

}  // namespace onebit
