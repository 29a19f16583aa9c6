// Python bindings of onebit's kernels (module onebit._C).
//
// Arrays cross as nanobind ndarrays (DLPack), without copies. Shapes and
// dtypes are validated here, so a kernel never sees an inconsistent call;
// kernels run with the GIL released.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>

#include "kernels/isa.h"
#include "kernels/pack.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

using FloatMatrix = nb::ndarray<const float, nb::ndim<2>, nb::device::cpu>;
using WordMatrix = nb::ndarray<int64_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

void pack_rows(FloatMatrix x, WordMatrix out) {
  const int64_t rows = static_cast<int64_t>(x.shape(0));
  const int64_t channels = static_cast<int64_t>(x.shape(1));
  require(channels == 0 || x.stride(1) == 1 || rows == 0,
          "pack_rows: channels must be contiguous (stride 1), got stride " + std::to_string(x.stride(1)));
  require(static_cast<int64_t>(out.shape(0)) == rows && static_cast<int64_t>(out.shape(1)) == onebit::words_for(channels),
          "pack_rows: out must have shape [" + std::to_string(rows) + ", " +
              std::to_string(onebit::words_for(channels)) + "]");
  const float* src = x.data();
  const int64_t row_stride = x.stride(0);
  uint64_t* dst = reinterpret_cast<uint64_t*>(out.data());
  nb::gil_scoped_release release;
  onebit::pack_rows(src, rows, channels, row_stride, dst);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "onebit's native kernels (bit-packing and binary layers).";
  m.def("isa", [] { return std::string(onebit::isa_name(onebit::active_isa())); },
        "The instruction set the kernels use now: avx512, avx2, scalar or reference.");
  m.def("set_isa", &onebit::set_isa, "name"_a,
        "Force the kernels onto one instruction set (avx512, avx2, scalar, reference).");
  m.def("supported_isas", &onebit::supported_isas, "Instruction sets this CPU can run, fastest first.");
  m.def("pack_rows", &pack_rows, "x"_a, "out"_a,
        "Pack a float32 [rows, channels] matrix into int64 [rows, ceil(channels/64)] words: bit set = x < 0.");
}
