// The kernels of each instruction set, as one table per ISA: every driver (the convolution's
// tiles, activation and row packing, the ternary x int8 layer, the float relayout) picks its kernel as
// isa_kernels(active_isa()).<entry>, so that adding an ISA is one row here (dispatch.cpp).
// A null entry means "no kernel of this ISA": the driver runs its portable path.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/channel_affine.h"
#include "kernels/conv.h"
#include "kernels/int8_conv.h"
#include "kernels/isa.h"
#include "kernels/ordered_conv.h"
#include "kernels/pool_float.h"
#include "kernels/relayout.h"
#include "kernels/ternary_linear.h"

namespace onebit {

// One image row of W pixels into packed words (see pack.h): (x, W, pixel or channel stride, Cg, G, out).
using PackRow = void (*)(const float* x, int64_t W, int64_t stride, int64_t Cg, int64_t G, uint64_t* out);
using PackRows = void (*)(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);
using QuantizeToken = bool (*)(const float* x, int64_t K, int8_t* q, float* s_out);
using RmsNormRow = void (*)(const float* x, int64_t K, float eps, int lanes, float* y);

struct IsaKernels {
  const std::vector<ConvKernel>& (*conv_tiles)();  // the conv's register tiles; null: binary_conv2d_reference
  PackRows pack_rows;                              // never null
  PackRow pack_row_cl;                             // channels contiguous; null: pack_row_strided_reference
  PackRow pack_row_nchw;                           // pixels contiguous; null: pack_row_strided_reference
  ternary::ChunkDot chunk_dot;                     // null: ternary_rows_reference
  QuantizeToken quantize_token;                    // null: ternary::quantize_token
  TransposeBlock transpose_block;                  // NCHW <-> channels_last planes; null: transpose_block_reference
  MaxPoolPixels max_pool_pixels;                   // float max pool, a run of pixels; null: reference
  ternary::RowsDot rows_dot;                       // all tokens a row pass; null: chunk_dot per token
  int8::ConvRun int8_conv;                         // int8 x int8 conv / linear; null: int8::conv_reference
  OrderedConvChannels ordered_conv;                // float 1x1 conv in channel order; null: reference
  TapConvRows tap_conv;                            // float stem conv, fma chains in tap order; null: reference
  RmsNormRow rms_norm;                             // BitLinear's norm in torch's order; null: rms_norm_torch_order
  ChannelAffineRows channel_affine;                // depthwise 1x1 float conv; null: channel_affine_rows_portable
  // the conv kernel writing a float32 NCHW output directly, for a call it runs; null: a tile + transposes
  const ConvKernel* (*conv_nchw)(const ConvGeometry& g, const ConvOutput& o, int nclasses);
};

const IsaKernels& isa_kernels(Isa isa);

}  // namespace onebit
