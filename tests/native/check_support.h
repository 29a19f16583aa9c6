// The check program's random shapes, its report, and the plain-loop references of the packing
// kernels, bit planes and ternary linear layer (from their definitions in pack.h, bitplanes.h and
// ternary_linear.h, written without the library's code).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>
#include <vector>

namespace onebit_check {

inline std::string str(int64_t v) { return std::to_string(v); }

inline int usage(const char* program, const std::string& problem) {
  std::fprintf(stderr, "%s: %s\nusage: %s [--seed S] [--count N] [--verbose]\n", program, problem.c_str(), program);
  return 2;
}

// splitmix64: the same numbers from the same seed on every machine and compiler.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  int64_t range(int64_t lo, int64_t hi) { return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1)); }
  int64_t pick(std::initializer_list<int64_t> values) { return values.begin()[range(0, values.size() - 1)]; }
  bool coin() { return next() & 1; }
  // Roughly normal floats (sum of uniforms), exact in their last bits from the integers drawn.
  std::vector<float> normals(int64_t n) {
    std::vector<float> out(static_cast<size_t>(n));
    for (float& v : out) {
      double s = -2.0;
      for (int k = 0; k < 4; ++k) s += static_cast<double>(next() >> 11) * 0x1.0p-53;
      v = static_cast<float>(s * 1.7);
    }
    return out;
  }
  // Normals with a sprinkling of the sign convention's edge cases: +0.0, -0.0 (both +1), NaN (+1).
  std::vector<float> floats(int64_t n) {
    std::vector<float> out = normals(n);
    for (float& v : out) {
      const uint64_t k = next() % 32;
      if (k == 0) v = 0.0f;
      if (k == 1) v = -0.0f;
      if (k == 2) v = std::nanf("");
    }
    return out;
  }

 private:
  uint64_t state_;
};

// Counts checks, prints a FAIL line for each mismatch, and the total at the end.
class Report {
 public:
  explicit Report(bool verbose) : verbose_(verbose) {}
  void set_case(int64_t i) { case_ = i; }
  void check(bool ok, const std::string& kernel, const std::string& isa, const std::string& detail,
             const std::string& shape) {
    ++(ok ? passed_ : failed_);
    const std::string what = kernel + " isa=" + isa + (detail.empty() ? "" : " [" + detail + "]") + " case " +
                             str(case_) + ": " + shape;
    if (!ok) std::printf("FAIL %s\n", what.c_str());
    else if (verbose_) std::printf("ok   %s\n", what.c_str());
  }
  void trace(const std::string& what) const {
    if (verbose_) std::printf("case %lld: %s\n", static_cast<long long>(case_), what.c_str());
  }
  int finish() const {
    std::printf("%lld passed, %lld failed\n", static_cast<long long>(passed_), static_cast<long long>(failed_));
    return failed_ ? 1 : 0;
  }

 private:
  bool verbose_;
  int64_t case_ = 0, passed_ = 0, failed_ = 0;
};

inline int64_t words(int64_t channels) { return (channels + 63) / 64; }

// [rows, channels] floats (row stride) -> [rows, words] words: bit c % 64 of word c / 64 set iff x < 0.
inline std::vector<uint64_t> naive_pack_rows(const float* x, int64_t rows, int64_t channels, int64_t stride) {
  std::vector<uint64_t> out(static_cast<size_t>(rows * words(channels)), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < channels; ++c)
      if (x[r * stride + c] < 0.0f) out[r * words(channels) + c / 64] |= uint64_t{1} << (c % 64);
  return out;
}

// Float [N, C, H, W] (element strides) -> [N, H + 2 ph, W + 2 pw, G, Wg]; the border is +1 (zero
// words) for pad_value 0 and +1, -1 (the real channels' bits set) for -1.
inline std::vector<uint64_t> naive_pack_activations(const float* x, int64_t N, int64_t C, int64_t H, int64_t W,
                                                    int64_t sN, int64_t sC, int64_t sH, int64_t sW, int64_t ph,
                                                    int64_t pw, int pad_value, int64_t G) {
  const int64_t Cg = C / G, Wg = words(Cg), Hp = H + 2 * ph, Wp = W + 2 * pw;
  std::vector<uint64_t> out(static_cast<size_t>(N * Hp * Wp * G * Wg), 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hp; ++h)
      for (int64_t w = 0; w < Wp; ++w)
        for (int64_t c = 0; c < C; ++c) {
          const bool border = h < ph || h >= ph + H || w < pw || w >= pw + W;
          const bool negative = border ? pad_value < 0 : x[n * sN + c * sC + (h - ph) * sH + (w - pw) * sW] < 0.0f;
          if (negative) out[(((n * Hp + h) * Wp + w) * G + c / Cg) * Wg + c % Cg / 64] |= uint64_t{1} << (c % Cg % 64);
        }
  return out;
}

// k-bit level indices as +-1 planes (bitplanes.h): [N, Hp, Wp, P * G, Wg], plane i of group g in
// group i * G + g, packed bit set where bit i of q is clear. Border: -1 in every plane (unsigned),
// +1 (symmetric). nan: whether x holds a NaN.
inline std::vector<uint64_t> naive_planes(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN,
                                          int64_t sC, int64_t sH, int64_t sW, int64_t ph, int64_t pw, int64_t G,
                                          bool symmetric, int bits, float clip, bool& nan) {
  const int64_t Cg = C / G, Wg = words(Cg), Hp = H + 2 * ph, Wp = W + 2 * pw, P = bits, PG = P * G;
  const float n_levels = static_cast<float>((1 << bits) - 1);
  std::vector<uint64_t> out(static_cast<size_t>(N * Hp * Wp * PG * Wg), 0);
  nan = false;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < Hp; ++h)
      for (int64_t w = 0; w < Wp; ++w)
        for (int64_t c = 0; c < C; ++c) {
          const bool border = h < ph || h >= ph + H || w < pw || w >= pw + W;
          int q = 0;  // border: level 0 (every plane -1) for unsigned; symmetric borders stay +1
          if (border && symmetric) continue;
          if (!border) {
            float v = x[n * sN + c * sC + (h - ph) * sH + (w - pw) * sW];
            nan = nan || std::isnan(v);
            if (symmetric) {
              v = v < -clip ? -clip : (v > clip ? clip : v);
              float u = v / clip;
              u = u + 1.0f;
              u = u / 2.0f;
              u = u * n_levels;
              u = u + 0.5f;
              q = static_cast<int>(std::floor(u));
            } else {
              v = v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v);
              q = static_cast<int>(std::nearbyint(v * n_levels));
            }
          }
          for (int64_t i = 0; i < P; ++i)
            if (!(q >> i & 1))
              out[(((n * Hp + h) * Wp + w) * PG + i * G + c / Cg) * Wg + c % Cg / 64] |= uint64_t{1} << (c % Cg % 64);
        }
  return out;
}

// Ternary x int8 (ternary_linear.h): acc[n, o] = sum_k q[n, k] (code - 1); the float layer quantizes
// each token (s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x s), -128, 127)) and writes
// fl(fl(fl(acc / s) * scale) + bias), NaN for a token with a NaN or an infinity.
inline void naive_ternary(const int8_t* q, const float* x, int64_t N, int64_t K, const uint8_t* w, int64_t O,
                          const float* scale, const float* bias, std::vector<int32_t>& out_int,
                          std::vector<float>& out_float) {
  const int64_t row_bytes = (K + 3) / 4;
  auto dot = [&](const int8_t* qn, int64_t o) {
    int32_t acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += qn[k] * (((w[o * row_bytes + k / 4] >> (2 * (k % 4))) & 3) - 1);
    return acc;
  };
  out_int.assign(static_cast<size_t>(N * O), 0);
  out_float.assign(static_cast<size_t>(N * O), 0.0f);
  std::vector<int8_t> xq(static_cast<size_t>(K));
  for (int64_t n = 0; n < N; ++n) {
    float m = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      finite = finite && std::isfinite(x[n * K + k]);
      m = std::fabs(x[n * K + k]) > m ? std::fabs(x[n * K + k]) : m;
    }
    const float s = 127.0f / (m > 1e-5f ? m : 1e-5f);
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::nearbyint(x[n * K + k] * s);
      xq[k] = static_cast<int8_t>(v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v));
    }
    for (int64_t o = 0; o < O; ++o) {
      out_int[n * O + o] = dot(q + n * K, o);
      float v = static_cast<float>(dot(xq.data(), o)) / s;
      v = v * scale[o];
      v = v + bias[o];
      out_float[n * O + o] = finite ? v : std::nanf("");
    }
  }
}

}  // namespace onebit_check
