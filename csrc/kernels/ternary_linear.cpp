// The ternary x int8 linear layer: token quantization, the run-time choice of kernel, threads
// over output rows (see ternary_linear.h).
#include "kernels/ternary_linear.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/dispatch.h"
#include "kernels/isa.h"
#include "kernels/parallel.h"
#include "kernels/rms_norm.h"

namespace onebit {
namespace {

using ternary::ChunkDot;
using ternary::RowsDot;

constexpr int64_t kRowBlock = 64;     // output rows a thread claims at a time
constexpr int64_t kTokenBlock = 8;    // tokens a pass over a row block serves
constexpr int64_t kSerialMacs = 1 << 21;  // smaller layers stay on the calling thread

constexpr int64_t kSerialTokenWork = 1 << 16;  // token elements below which tokens are prepared on one thread

ChunkDot chunk_kernel() { return isa_kernels(active_isa()).chunk_dot; }  // null: the plain loops

// fn(n0, n1) over the tokens [0, N), split between threads when there are several tokens and enough of them
// (a prefill's: normalizing, quantizing and permuting them is otherwise a serial part of the call).
template <class Fn>
void for_tokens(int64_t N, int64_t K, int threads, const Fn& fn) {
  if (threads <= 1 || N < 2 || N * K < kSerialTokenWork) {
    fn(int64_t{0}, N);
    return;
  }
  const int chunks = static_cast<int>(std::min<int64_t>(N, 4 * static_cast<int64_t>(threads)));
  parallel_chunks(threads, chunks, [&](int c) { fn(N * c / chunks, N * (c + 1) / chunks); });
}

// The shared loop: acc for every (token, row block), handed to epi(n, o0, rows, acc).
template <class Epilogue>
void run(const int8_t* q, int64_t N, int64_t K, const uint8_t* w, int64_t O, int threads, const Epilogue& epi) {
  if (N <= 0 || O <= 0) return;
  const int64_t row_bytes = ternary_row_bytes(K);
  const ChunkDot kernel = chunk_kernel();
  const int64_t chunks = kernel ? K / 256 : 0;
  const int64_t main = 256 * chunks;
  std::vector<int8_t> xperm(static_cast<size_t>(N * main));
  std::vector<int32_t> qsum(static_cast<size_t>(N), 0);
  if (N * O * K < kSerialMacs) threads = 1;
  for_tokens(N, main, threads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* qn = q + n * K;
      int8_t* xp = xperm.data() + n * main;
      int32_t sum = 0;
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j < 64; ++j)
          for (int64_t i = 0; i < 4; ++i) {
            const int8_t v = qn[256 * c + 4 * j + i];
            xp[256 * c + 64 * i + j] = v;
            sum += v;
          }
      qsum[n] = sum;
    }
  });
  const int64_t blocks = (O + kRowBlock - 1) / kRowBlock;
  const RowsDot rows_kernel = kernel ? isa_kernels(active_isa()).rows_dot : nullptr;
  parallel_chunks(threads, static_cast<int>(blocks), [&](int b) {
    const int64_t o0 = b * kRowBlock, rows = std::min(kRowBlock, O - o0);
    const uint8_t* wb = w + o0 * row_bytes;
    int32_t dots[kTokenBlock * kRowBlock];
    for (int64_t n0 = 0; n0 < N; n0 += kTokenBlock) {  // the block's codes read once per kTokenBlock tokens
      const int64_t tokens = std::min(kTokenBlock, N - n0);
      if (rows_kernel) {
        rows_kernel(xperm.data() + n0 * main, main, tokens, chunks, wb, row_bytes, rows, dots);
      } else if (kernel) {
        for (int64_t t = 0; t < tokens; ++t)
          kernel(xperm.data() + (n0 + t) * main, chunks, wb, row_bytes, rows, dots + t * rows);
      }
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t n = n0 + t;
        const int8_t* qn = q + n * K;
        int32_t* acc = dots + t * rows;
        if (kernel) {
          for (int64_t r = 0; r < rows; ++r) acc[r] -= qsum[n];
          if (main < K) {  // the features after the last full chunk
            int32_t tail[kRowBlock];
            ternary::ternary_rows_reference(qn + main, K - main, wb + main / 4, row_bytes, rows, tail);
            for (int64_t r = 0; r < rows; ++r) acc[r] += tail[r];
          }
        } else {
          ternary::ternary_rows_reference(qn, K, wb, row_bytes, rows, acc);
        }
        epi(n, o0, rows, acc);
      }
    }
  });
}

}  // namespace

const char* ternary_linear_kernel() {
  const ChunkDot kernel = chunk_kernel();
#if ONEBIT_X86
  if (kernel == ternary::chunk_dot_vnni) return "avx512_vnni";
  if (kernel == ternary::chunk_dot_avx2) return "avx2";
#endif
#if ONEBIT_NEON
  if (kernel == ternary::chunk_dot_neon_dotprod) return "neon_dotprod";
  if (kernel == ternary::chunk_dot_neon) return "neon";
#endif
  return "reference";
}

void ternary_linear_int(const int8_t* x, int64_t N, int64_t K, const uint8_t* w, int64_t O, int32_t* out,
                        int threads) {
  run(x, N, K, w, O, threads, [&](int64_t n, int64_t o0, int64_t rows, const int32_t* acc) {
    std::copy(acc, acc + rows, out + n * O + o0);
  });
}

void ternary_linear(const float* x, int64_t N, int64_t K, int64_t x_stride, const uint8_t* w, int64_t O,
                    const float* scale, const float* bias, float* out, int threads, int norm_lanes,
                    float norm_eps) {
  if (N <= 0 || O <= 0) return;
  std::vector<int8_t> q(static_cast<size_t>(N * K));
  std::vector<float> s(static_cast<size_t>(N));
  std::vector<char> finite(static_cast<size_t>(N));
  const QuantizeToken quantize = isa_kernels(active_isa()).quantize_token;
  for_tokens(N, K, N * O * K < kSerialMacs ? 1 : threads, [&](int64_t n0, int64_t n1) {
    std::vector<float> normed(norm_lanes > 0 ? static_cast<size_t>(K) : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const float* xn = x + n * x_stride;
      if (norm_lanes > 0) {
        rms_norm_rows(xn, 1, K, K, norm_eps, norm_lanes, normed.data());
        xn = normed.data();
      }
      finite[n] = quantize ? quantize(xn, K, q.data() + n * K, &s[n])
                           : ternary::quantize_token(xn, K, q.data() + n * K, &s[n]);
    }
  });
  run(q.data(), N, K, w, O, threads, [&](int64_t n, int64_t o0, int64_t rows, const int32_t* acc) {
    float* y = out + n * O + o0;
    if (!finite[n]) {
      std::fill(y, y + rows, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    const float sn = s[n];
    for (int64_t r = 0; r < rows; ++r) {
      float v = static_cast<float>(acc[r]) / sn;  // exact int -> float: |acc| <= 128 K < 2^24
      if (scale) v = v * scale[o0 + r];
      if (bias) v = v + bias[o0 + r];
      y[r] = v;
    }
  });
}

}  // namespace onebit
