// Bit-packing of float activations: onebit's one bit convention.
//
//   bit = 1  <=>  x < 0  (the value -1);   bit = 0  <=>  x >= 0 (the value +1)
//
// so sign(0) = sign(-0.0) = +1, and NaN packs as +1. Channels are packed
// along 64-bit words, channel c in word c / 64 at bit c % 64, in a
// channels-last layout: a [rows, channels] float matrix becomes a
// [rows, words] uint64 matrix with words = ceil(channels / 64). The unused
// high bits of the last word are always 0, in activations and weights alike,
// so they never change an xor-popcount.
#pragma once
#include <cstdint>

namespace onebit {

inline int64_t words_for(int64_t channels) { return (channels + 63) / 64; }

// x: rows x channels floats, row i starting at x + i * row_stride.
// out: rows x words_for(channels) words, contiguous.
void pack_rows(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);

void pack_rows_reference(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);
void pack_rows_scalar(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);
void pack_rows_avx2(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);
void pack_rows_avx512(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);

}  // namespace onebit
