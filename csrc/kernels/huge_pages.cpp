// See huge_pages.h.
#include "kernels/huge_pages.h"

#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace onebit {

HugePageBuffer huge_page_alloc(int64_t nbytes) {
  HugePageBuffer b;
  if (nbytes <= 0) return b;
  const size_t size = static_cast<size_t>(nbytes), page = static_cast<size_t>(kHugePage);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // a fresh mapping (malloc may hand out heap pages touched before, which stay small), one huge page
  // longer than asked so that a 2 MiB boundary lies within its first page
  const size_t length = size + page;
  void* base = mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return b;
  const uintptr_t start = (reinterpret_cast<uintptr_t>(base) + page - 1) / page * page;
  b.data = reinterpret_cast<void*>(start);
  b.base = base;
  b.length = length;
  const size_t whole = size / page * page;  // a partial last page stays small: no memory wasted
  b.advised = whole > 0 && madvise(b.data, whole, MADV_HUGEPAGE) == 0;
#else
  const size_t rounded = (size + page - 1) / page * page;  // aligned_alloc wants a multiple
  b.data = std::aligned_alloc(page, rounded);
  b.base = b.data;
  b.length = rounded;
#endif
  return b;
}

void huge_page_free(const HugePageBuffer& b) {
  if (b.base == nullptr) return;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  munmap(b.base, b.length);
#else
  std::free(b.base);
#endif
}

}  // namespace onebit
