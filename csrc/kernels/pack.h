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
void pack_rows_neon(const float* x, int64_t rows, int64_t channels, int64_t row_stride, uint64_t* out);

// ---- activations: float [N, C, H, W] with any element strides -> packed, padded
// [N, H + 2 ph, W + 2 pw, G, Wg] with Wg = words_for(C / G): group g's channels
// g * C/G .. (g + 1) * C/G - 1 in their own words. Padded positions hold +1 (all
// zero words) for pad_value 0 or +1, and -1 in the real channels for pad_value -1.
// Throws std::invalid_argument on inconsistent numbers.
void pack_activations(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                      int64_t sW, int64_t ph, int64_t pw, int pad_value, int64_t G, uint64_t* out, int threads);

// The same, one piece at a time, for callers that pack inside their own parallel
// region (a convolution that packs its float input in the same pass): border()
// writes the padding, row(r) packs image row r = n * H + h. The constructor
// validates the numbers (std::invalid_argument); row() may run on any thread.
class ActivationPacker {
 public:
  ActivationPacker(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN, int64_t sC, int64_t sH,
                   int64_t sW, int64_t ph, int64_t pw, int pad_value, int64_t G, uint64_t* out);
  int64_t rows() const { return N_ * H_; }
  void border() const;
  void row(int64_t r) const;

 private:
  const float* x_;
  int64_t N_, C_, H_, W_, sN_, sC_, sH_, sW_, ph_, pw_, G_, Cg_, Hp_, Wp_, px_;
  int pad_value_;
  uint64_t* out_;
  // the active ISA's row kernel for these strides (null: the strided reference) and its stride argument
  void (*row_kernel_)(const float*, int64_t, int64_t, int64_t, int64_t, uint64_t*) = nullptr;
  int64_t row_stride_ = 0;
};

// One image row (fixed n, h) of W pixels into out (pixel stride G * Wg words):
//   _cl:      channels contiguous (x at (c = 0, w = 0), pixel stride sW floats)
//   _nchw:    pixels contiguous (x at (c = 0, w = 0), channel stride sC floats)
//   _strided: any strides (the reference for both)
void pack_row_strided_reference(const float* x, int64_t W, int64_t sW, int64_t sC, int64_t Cg, int64_t G,
                                uint64_t* out);
void pack_row_cl_scalar(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_nchw_scalar(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_cl_avx2(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_nchw_avx2(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_cl_avx512(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_nchw_avx512(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_cl_neon(const float* x, int64_t W, int64_t sW, int64_t Cg, int64_t G, uint64_t* out);
void pack_row_nchw_neon(const float* x, int64_t W, int64_t sC, int64_t Cg, int64_t G, uint64_t* out);

}  // namespace onebit
