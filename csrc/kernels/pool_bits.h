// Max pooling of thresholded accumulators on their packed bits (one portable loop: the
// work is a few ORs per output word, bound by memory, not by the instruction set).
#pragma once

#include <cstdint>

namespace onebit {

struct PoolBitsGeometry {
  int64_t N, H, W, G, Wg;  // input [N, H, W, G, Wg]
  int64_t Cg;              // channels per group (the used bits of each group's Wg words)
  int64_t OH, OW;          // pooled size, before out_padding
  int64_t KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t OPH, OPW;        // out_padding: border pixels filled with pad words
};

// out[n, oph + oy, opw + ox, k] = flip[k] ^ OR over the window's in-bounds taps of (x[...][k] ^ flip[k]),
// where flip = the used channel bits not in or_mask (the channels whose pooled bit is an AND of the
// window's bits: AND = NOT OR NOT); border pixels of out (out_padding) = pad[k]. A window without an
// in-bounds tap gives flip[k].
void max_pool_bits(const uint64_t* x, const uint64_t* or_mask, const uint64_t* pad, uint64_t* out,
                   const PoolBitsGeometry& g);

}  // namespace onebit
