// Memory for large constant operands (a packed model's weights) in transparent huge pages.
//
// A layer whose weights do not fit in the caches streams them from memory on every call (a language
// model's BitLinear layers). With 4 KiB pages that stream crosses a page, and a TLB entry, every 4 KiB:
// each needs a page walk, and the hardware prefetchers stop at every page boundary. A buffer aligned
// to 2 MiB, its whole 2 MiB pages advised as huge pages (Linux madvise MADV_HUGEPAGE, which the
// kernel honours in its "madvise" and "always" THP modes) before anything touches them, streams from
// one TLB entry per 2 MiB.
#pragma once
#include <cstddef>
#include <cstdint>

namespace onebit {

constexpr int64_t kHugePage = int64_t{2} << 20;

struct HugePageBuffer {
  void* data = nullptr;    // nbytes, starting on a kHugePage boundary; null when out of memory
  void* base = nullptr;    // the mapping (or allocation) that holds them, for huge_page_free
  size_t length = 0;       // its bytes
  bool advised = false;    // whether the kernel took the advice for the whole 2 MiB pages (false off Linux)
};

// nbytes (> 0) of untouched memory: on Linux a fresh private mapping, so its pages are first faulted
// in after the advice, as huge pages (the bytes past the last whole 2 MiB page stay in normal pages);
// elsewhere aligned_alloc.
HugePageBuffer huge_page_alloc(int64_t nbytes);
void huge_page_free(const HugePageBuffer& buffer);

}  // namespace onebit
