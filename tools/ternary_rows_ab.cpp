// The ternary x int8 kernel alone, x86-64, one thread: the per-token ChunkDot (one pass over a
// 64-row block per token, four rows interleaved) against the RowsDot the driver now calls (the
// block's rows once for up to 8 tokens, in memory order, prefetched), on the 4096 x 4096 layer,
// warm (one weight matrix) and cold (26 copies in turn, 109 MB, past a 32 MB L3), beside a plain
// read of a cold copy (the stream the cold kernel cannot beat). Times are thread CPU time
// (other processes' time slices excluded), medians and minima of 15 interleaved samples of 40 calls;
// both kernels' sums are compared first.
//
//   V="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mavx2"
//   g++ -O3 -std=c++17 -Icsrc $V -c csrc/kernels/ternary_linear_vnni.cpp -o /tmp/v.o
//   g++ -O3 -std=c++17 -Icsrc -mavx2 -mfma -c csrc/kernels/ternary_linear_avx2.cpp -o /tmp/a.o
//   g++ -O3 -std=c++17 -Icsrc tools/ternary_rows_ab.cpp /tmp/v.o /tmp/a.o -o /tmp/ternary_rows_ab
//   /tmp/ternary_rows_ab TOKENS VNNI          # e.g. 1 1 (AVX-512 VNNI) or 8 0 (AVX2)
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels/ternary_linear.h"

using namespace onebit::ternary;

namespace {

double cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

// Every byte of w read once, front to back (xor of its 64-bit words: vectorized, bound by the loads).
uint64_t read_all(const uint8_t* w, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t word;
    std::memcpy(&word, w + i, 8);
    acc ^= word;
  }
  return acc;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t K = 4096, O = 4096, row_bytes = K / 4, chunks = K / 256, block = 64;
  const int N = argc > 1 ? std::atoi(argv[1]) : 1;
  const bool vnni = argc > 2 ? std::atoi(argv[2]) : 1;
  if (N < 1 || N > 8) return std::fprintf(stderr, "TOKENS must be 1..8\n"), 2;
  const int copies = 26;
  std::vector<std::vector<uint8_t>> ws(copies, std::vector<uint8_t>(O * row_bytes));
  std::srand(1);
  for (auto& w : ws)
    for (auto& b : w) {
      int byte = 0;
      for (int i = 0; i < 4; ++i) byte |= (std::rand() % 3) << (2 * i);  // four codes in {0, 1, 2}
      b = static_cast<uint8_t>(byte);
    }
  std::vector<int8_t> x(N * K);  // permuted activations, as the driver hands them over
  for (auto& v : x) v = static_cast<int8_t>(std::rand() % 255 - 127);
  std::vector<int32_t> per_token(N * O), rows(N * O);
  const ChunkDot chunk_dot = vnni ? chunk_dot_vnni : chunk_dot_avx2;
  const RowsDot rows_dot = vnni ? rows_dot_vnni : rows_dot_avx2;
  auto per_token_call = [&](const uint8_t* w) {
    int32_t acc[block];
    for (int64_t o0 = 0; o0 < O; o0 += block)
      for (int n = 0; n < N; ++n) {
        chunk_dot(x.data() + n * K, chunks, w + o0 * row_bytes, row_bytes, block, acc);
        std::memcpy(&per_token[n * O + o0], acc, sizeof acc);
      }
  };
  auto rows_call = [&](const uint8_t* w) {
    int32_t dots[8 * block];
    for (int64_t o0 = 0; o0 < O; o0 += block) {
      rows_dot(x.data(), K, N, chunks, w + o0 * row_bytes, row_bytes, block, dots);
      for (int n = 0; n < N; ++n) std::memcpy(&rows[n * O + o0], dots + n * block, block * sizeof(int32_t));
    }
  };
  per_token_call(ws[0].data());
  rows_call(ws[0].data());
  if (per_token != rows) return std::fprintf(stderr, "the two kernels' sums differ\n"), 1;
  const char* names[] = {"chunk_dot warm", "chunk_dot cold", "rows_dot warm", "rows_dot cold", "read cold"};
  std::vector<double> t[5];
  int next = 0;
  volatile uint64_t sink = 0;
  for (int rep = 0; rep < 15; ++rep)
    for (int k = 0; k < 5; ++k) {
      const int calls = 40;
      const double t0 = cpu_seconds();
      for (int i = 0; i < calls; ++i) {
        const uint8_t* w = (k & 1) || k == 4 ? ws[next++ % copies].data() : ws[0].data();
        if (k == 4) sink = sink + read_all(w, O * row_bytes);
        else if (k < 2) per_token_call(w);
        else rows_call(w);
      }
      t[k].push_back((cpu_seconds() - t0) / calls * 1e6);
    }
  std::printf("%d token(s), %s\n", N, vnni ? "AVX-512 VNNI" : "AVX2");
  for (int k = 0; k < 5; ++k) {
    std::sort(t[k].begin(), t[k].end());
    std::printf("  %-15s %7.1f us (min %.1f)\n", names[k], t[k][t[k].size() / 2], t[k][0]);
  }
}
