// Register tiles of the convolution kernels, and the choice among them.
//
// Every ISA's kernel comes in a few register tiles (output pixels x output channels
// per inner loop, e.g. AVX2 2x16, 3x8, 4x8). All of them compute the same exact
// integers; which one is fastest is a property of the core (load ports, register
// file, vpshufb throughput), so it is measured on the machine that runs:
//   1. a tile forced for the ISA (set_tile, or ONEBIT_TILE=avx2:3x8,avx512:7x32) wins;
//   2. else the plan's own choice, made at its first run on that ISA;
//   3. else a process-wide choice for the same layer shape (any plan, same ISA);
//   4. else every tile is timed on the layer's shape (a sample of its pixels and
//      channels, scratch data: xor / popcount / shuffle timings do not depend on the
//      values), a few interleaved rounds bounded to a few milliseconds, and the
//      fastest is kept in 3 and 2. Later calls pay one atomic load.
#pragma once
#include <atomic>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/conv.h"
#include "kernels/isa.h"

namespace onebit {

// The ISA's tiles (null for the reference ISA, which has none).
const std::vector<ConvKernel>* conv_tiles(Isa isa);
// Their names, for the bindings and error messages.
std::vector<std::string> tile_names(const std::string& isa);
// Forces a tile for an ISA ("auto" or "" restores the timed choice). Throws
// std::invalid_argument naming the valid ISAs or tiles.
void set_tile(const std::string& isa, const std::string& name);
// The forced tile's name, or "auto".
std::string forced_tile(const std::string& isa);
// Parses ONEBIT_TILE once (called at import, so a bad value fails there, clearly).
void init_tiles_from_env();

// The tile index for one run of a plan on `isa`; `proto` describes the layer (every
// field but the block's channels and pixels); `plan_choice` is the plan's slot for isa.
int choose_tile(Isa isa, const ConvBlock& proto, std::atomic<int>& plan_choice);

// The process-wide choices so far: (isa, layer shape, tile name).
std::vector<std::tuple<std::string, std::string, std::string>> tile_choices();

}  // namespace onebit
