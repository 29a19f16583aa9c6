// Register tile selection for the convolution kernels (see conv_tiles.h).
#include "kernels/conv_tiles.h"
#include "kernels/dispatch.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <stdexcept>

namespace onebit {
namespace {

// Timing: each sample runs about this many word steps (pixels x channels x steps),
// repeated up to kRounds interleaved rounds while the whole choice stays under kBudget.
constexpr int64_t kSampleWork = int64_t{1} << 19;
constexpr int kRounds = 5;
constexpr double kBudget = 4e-3;   // seconds
constexpr double kMinSample = 5e-5;  // seconds per timed sample (repeated runs when shorter)

std::atomic<int> forced[kIsaCount] = {-1, -1, -1, -1, -1, -1};

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

Isa parse_isa(const std::string& name) {
  std::vector<std::string> names;
  for (Isa isa : kIsasFastestFirst) {
    if (name == isa_name(isa)) return isa;
    names.emplace_back(isa_name(isa));
  }
  throw std::invalid_argument("unknown ISA '" + name + "': expected one of " + joined(names));
}

int tile_index(const std::string& isa, const std::string& name) {
  const std::vector<std::string> names = tile_names(isa);
  if (names.empty()) throw std::invalid_argument("the " + isa + " ISA has no register tiles to choose from");
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == name) return static_cast<int>(i);
  throw std::invalid_argument("unknown " + isa + " tile '" + name + "': expected one of " + joined(names) +
                              " (or auto)");
}

// A layer's shape, as far as the tiles' speed is concerned (one image; any output mode).
using Key = std::array<int64_t, 15>;
Key key_of(Isa isa, const ConvGeometry& g) {
  return {static_cast<int64_t>(isa), g.C, g.Co, g.G, g.H, g.W, g.KH, g.KW, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
          g.pad_value};
}

std::mutex choices_mutex;  // guards choices
std::map<Key, int> choices;
std::mutex timing_mutex;  // one timing at a time: two would disturb each other

struct Freed {
  void operator()(void* p) const { std::free(p); }
};
using Buffer = std::unique_ptr<char, Freed>;
Buffer aligned(size_t bytes) {
  Buffer b(static_cast<char*>(std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64))));
  if (!b) throw std::bad_alloc();
  std::memset(b.get(), 0, bytes);
  return b;
}

double seconds() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Times every tile on a sample of the layer: the first output channels of group 0
// (a multiple of every tile's block width when the layer has that many) against the
// first pixels of image 0, on zero scratch data, into a scratch int32 output.
int time_tiles(const std::vector<ConvKernel>& tiles, const ConvBlock& proto) {
  const ConvGeometry& g = *proto.g;
  const int64_t steps = g.KH * g.KW * g.Wg;
  int64_t lcm = 1, widest = 1;
  for (const ConvKernel& k : tiles) {
    lcm = std::lcm<int64_t>(lcm, k.block_co);
    widest = std::max<int64_t>(widest, k.tile_pix);
  }
  const int64_t channels = std::min<int64_t>(g.Cog, 2 * lcm);
  const int64_t image = g.OH * g.OW;
  const int64_t pixels = std::min(image, std::max(4 * widest, kSampleWork / (channels * steps)));

  const int64_t x_words = g.Hp * g.Wp * g.G * g.Wg;
  Buffer x = aligned(x_words * 8), w = aligned(channels * steps * 8), out = aligned(pixels * g.Co * 4);
  ConvOutput o;
  o.mode = OutMode::int32;
  o.out_i32 = reinterpret_cast<int32_t*>(out.get());
  o.ld = o.residual_ld = g.Co;
  ConvBlock b = proto;
  b.o = &o;
  b.x = reinterpret_cast<const uint64_t*>(x.get());
  b.w = reinterpret_cast<const uint64_t*>(w.get());
  b.bits_bytewise = false;
  b.q0 = 0;
  b.q1 = pixels;

  struct Candidate {
    Buffer input, blocks;
    size_t block_bytes = 0;
    int64_t nblocks = 0;
  };
  std::vector<Candidate> cand(tiles.size());
  for (size_t t = 0; t < tiles.size(); ++t) {
    const ConvKernel& k = tiles[t];
    Candidate& c = cand[t];
    if (k.prepare_input) {
      c.input = aligned(x_words * k.input_factor * 8);
      k.prepare_input(b.x, reinterpret_cast<uint64_t*>(c.input.get()), 0, g.Hp, g);  // one image
    }
    c.block_bytes = (k.block_bytes(g, b.nclasses) + 63) / 64 * 64;
    c.nblocks = (channels + k.block_co - 1) / k.block_co;
    c.blocks = aligned(c.block_bytes * c.nblocks);
    for (int64_t bi = 0; bi < c.nblocks; ++bi) {
      b.co0 = bi * k.block_co;
      b.nco = std::min<int64_t>(k.block_co, channels - b.co0);
      k.prepare(b, c.blocks.get() + bi * c.block_bytes);
    }
  }
  auto run = [&](size_t t, int reps) {
    const ConvKernel& k = tiles[t];
    const Candidate& c = cand[t];
    b.x_prepared = reinterpret_cast<const uint64_t*>(c.input.get());
    const double start = seconds();
    for (int r = 0; r < reps; ++r)
      for (int64_t bi = 0; bi < c.nblocks; ++bi) {
        b.co0 = bi * k.block_co;
        b.nco = std::min<int64_t>(k.block_co, channels - b.co0);
        k.compute(b, c.blocks.get() + bi * c.block_bytes);
      }
    return (seconds() - start) / reps;
  };

  const double start = seconds();
  std::vector<double> best(tiles.size());
  for (size_t t = 0; t < tiles.size(); ++t) best[t] = run(t, 1);  // also brings code and data in
  const int reps = static_cast<int>(std::clamp(kMinSample / std::max(best[0], 1e-9), 1.0, 64.0));
  for (int round = 0; round < kRounds && seconds() - start < kBudget; ++round)
    for (size_t t = 0; t < tiles.size(); ++t) best[t] = std::min(best[t], run(t, reps));
  return static_cast<int>(std::min_element(best.begin(), best.end()) - best.begin());
}

std::string shape_text(const Key& k) {
  auto s = [](int64_t v) { return std::to_string(v); };
  return s(k[1]) + "->" + s(k[2]) + " @" + s(k[4]) + "x" + s(k[5]) + " k" + s(k[6]) + "x" + s(k[7]) + " s" + s(k[8]) +
         "x" + s(k[9]) + " p" + s(k[10]) + "x" + s(k[11]) + " d" + s(k[12]) + "x" + s(k[13]) + " g" + s(k[3]) +
         " pad" + s(k[14]);
}

}  // namespace

const std::vector<ConvKernel>* conv_tiles(Isa isa) {
  const auto tiles = isa_kernels(isa).conv_tiles;
  return tiles ? &tiles() : nullptr;
}

std::vector<std::string> tile_names(const std::string& isa) {
  std::vector<std::string> names;
  if (const auto* tiles = conv_tiles(parse_isa(isa)))
    for (const ConvKernel& k : *tiles) names.emplace_back(k.name);
  return names;
}

void set_tile(const std::string& isa, const std::string& name) {
  const Isa which = parse_isa(isa);
  const int index = name.empty() || name == "auto" ? -1 : tile_index(isa, name);
  forced[static_cast<int>(which)].store(index, std::memory_order_relaxed);
}

std::string forced_tile(const std::string& isa) {
  const Isa which = parse_isa(isa);
  const int index = forced[static_cast<int>(which)].load(std::memory_order_relaxed);
  return index < 0 ? "auto" : (*conv_tiles(which))[index].name;
}

void init_tiles_from_env() {
  const char* env = std::getenv("ONEBIT_TILE");
  if (!env || !*env) return;
  const std::string text = env;
  try {
    for (size_t a = 0; a <= text.size();) {
      size_t e = text.find(',', a);
      if (e == std::string::npos) e = text.size();
      const std::string item = text.substr(a, e - a);
      a = e + 1;
      if (item.empty()) continue;
      const size_t colon = item.find(':');
      if (colon == std::string::npos) throw std::invalid_argument("expected isa:tile, got '" + item + "'");
      set_tile(item.substr(0, colon), item.substr(colon + 1));
    }
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument("ONEBIT_TILE=" + text + ": " + e.what());
  }
}

int choose_tile(Isa isa, const ConvBlock& proto, std::atomic<int>& plan_choice) {
  const int f = forced[static_cast<int>(isa)].load(std::memory_order_relaxed);
  if (f >= 0) return f;
  const int mine = plan_choice.load(std::memory_order_relaxed);
  if (mine >= 0) return mine;
  const std::vector<ConvKernel>& tiles = *conv_tiles(isa);
  const Key key = key_of(isa, *proto.g);
  auto known = [&](int& value) {
    std::lock_guard<std::mutex> lock(choices_mutex);
    const auto it = choices.find(key);
    if (it == choices.end()) return false;
    value = it->second;
    return true;
  };
  int chosen = 0;
  if (!known(chosen)) {
    std::lock_guard<std::mutex> timing(timing_mutex);
    if (!known(chosen)) {
      chosen = tiles.size() > 1 ? time_tiles(tiles, proto) : 0;
      std::lock_guard<std::mutex> lock(choices_mutex);
      choices.emplace(key, chosen);
    }
  }
  plan_choice.store(chosen, std::memory_order_relaxed);
  return chosen;
}

std::vector<std::tuple<std::string, std::string, std::string>> tile_choices() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  std::vector<std::tuple<std::string, std::string, std::string>> out;
  for (const auto& [key, index] : choices) {
    const Isa isa = static_cast<Isa>(key[0]);
    out.emplace_back(isa_name(isa), shape_text(key), (*conv_tiles(isa))[index].name);
  }
  return out;
}

}  // namespace onebit
