// The ISA: what this CPU supports (cpuid on x86-64, hardware capabilities on aarch64), the active
// one, and each ISA's kernels.
#include "kernels/dispatch.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kernels/isa.h"
#include "kernels/pack.h"
#include "kernels/rms_norm.h"
#include <string>
#if ONEBIT_X86
#include <cpuid.h>
#endif
#if ONEBIT_NEON && defined(__linux__)
#include <sys/auxv.h>
#endif
#if ONEBIT_NEON && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace onebit {
namespace {

#if ONEBIT_X86
unsigned long long xgetbv0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

struct CpuFeatures {
  bool popcnt = false, avx2 = false, avx512 = false, avx512_vnni = false, neon = false, dotprod = false;
  CpuFeatures() {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    popcnt = c & bit_POPCNT;
    const bool osxsave = c & bit_OSXSAVE;
    const bool avx = c & bit_AVX;
    if (!osxsave || !avx) return;
    const unsigned long long xcr0 = xgetbv0();
    const bool ymm_state = (xcr0 & 0x6) == 0x6;
    const bool zmm_state = (xcr0 & 0xe6) == 0xe6;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return;
    avx2 = ymm_state && (b & bit_AVX2) && (b & bit_BMI2) && popcnt;
    const bool f = b & bit_AVX512F, bw = b & bit_AVX512BW, vl = b & bit_AVX512VL, dq = b & bit_AVX512DQ;
    const bool vpopcntdq = c & bit_AVX512VPOPCNTDQ;
    avx512 = avx2 && zmm_state && f && bw && vl && dq && vpopcntdq;
    avx512_vnni = avx512 && (c & (1u << 11));  // CPUID.(EAX=7,ECX=0):ECX[11] AVX512_VNNI
  }
};
#elif ONEBIT_NEON
// AdvSIMD (NEON) is part of every aarch64 core; SDOT/UDOT (dotprod, Armv8.2+) is optional.
bool dotprod_available() {
#if defined(__linux__)
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  int value = 0;
  size_t size = sizeof value;
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value != 0;
#else
  return false;
#endif
}

struct CpuFeatures {
  bool popcnt = true, avx2 = false, avx512 = false, avx512_vnni = false, neon = true, dotprod = dotprod_available();
};
#else
struct CpuFeatures {  // no vector kernels here: the scalar kernels (portable popcount) and the reference
  bool popcnt = true, avx2 = false, avx512 = false, avx512_vnni = false, neon = false, dotprod = false;
};
#endif

std::string isa_list() {
  std::string out;
  for (Isa isa : kIsasFastestFirst) out += (out.empty() ? "" : ", ") + std::string(isa_name(isa));
  return out;
}

const CpuFeatures& cpu() {
  static const CpuFeatures features;
  return features;
}

Isa parse(const std::string& name) {
  for (Isa isa : kIsasFastestFirst)
    if (name == isa_name(isa)) return isa;
  throw std::invalid_argument("unknown ISA '" + name + "': expected one of " + isa_list());
}

Isa best_isa() {
  for (Isa isa : kIsasFastestFirst)
    if (isa_supported(isa)) return isa;
  return Isa::reference;
}

std::atomic<int>& active() {
  static std::atomic<int> value = [] {
    const char* forced = std::getenv("ONEBIT_ISA");
    if (forced && *forced) {
      const Isa isa = parse(forced);  // a bad value fails the import with a clear message
      if (!isa_supported(isa))
        throw std::invalid_argument(std::string("ONEBIT_ISA=") + forced + " is not supported by this CPU");
      return static_cast<int>(isa);
    }
    return static_cast<int>(best_isa());
  }();
  return value;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::reference: return "reference";
    case Isa::scalar: return "scalar";
    case Isa::avx2: return "avx2";
    case Isa::avx512: return "avx512";
    case Isa::neon: return "neon";
    case Isa::neon_dotprod: return "neon_dotprod";
  }
  return "?";
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::reference: return true;
    case Isa::scalar: return cpu().popcnt;
    case Isa::avx2: return cpu().avx2;
    case Isa::avx512: return cpu().avx512;
    case Isa::neon: return cpu().neon;
    case Isa::neon_dotprod: return cpu().neon && cpu().dotprod;
  }
  return false;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (Isa isa : kIsasFastestFirst)
    if (isa_supported(isa)) names.emplace_back(isa_name(isa));
  return names;
}

bool has_avx512_vnni() { return cpu().avx512_vnni; }

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

const IsaKernels& isa_kernels(Isa isa) {
  static const IsaKernels reference{nullptr, pack_rows_reference, nullptr, nullptr, nullptr, nullptr, nullptr};
  static const IsaKernels scalar{conv_kernels_scalar, pack_rows_scalar, pack_row_cl_scalar, pack_row_nchw_scalar,
                                 nullptr, nullptr, transpose_block_scalar};
#if ONEBIT_X86
  static const IsaKernels avx2{conv_kernels_avx2, pack_rows_avx2, pack_row_cl_avx2, pack_row_nchw_avx2,
                               ternary::chunk_dot_avx2, ternary::quantize_token_avx2, transpose_block_avx2,
                               max_pool_pixels_avx2, ternary::rows_dot_avx2, int8::conv_avx2,
                               ordered_conv_channels_avx2, tap_conv_rows_avx2, rms_norm_torch_order_avx2,
                               channel_affine_rows_avx2};
  // the int8 dot products use VNNI where the CPU has it (a feature on top of the avx512 level)
  static const IsaKernels avx512{conv_kernels_avx512, pack_rows_avx512, pack_row_cl_avx512, pack_row_nchw_avx512,
                                 has_avx512_vnni() ? ternary::chunk_dot_vnni : ternary::chunk_dot_avx2,
                                 ternary::quantize_token_avx2, transpose_block_avx512, max_pool_pixels_avx512,
                                 has_avx512_vnni() ? ternary::rows_dot_vnni : ternary::rows_dot_avx2,
                                 has_avx512_vnni() ? int8::conv_vnni : int8::conv_avx2,
                                 ordered_conv_channels_avx512, tap_conv_rows_avx512, rms_norm_torch_order_avx2,
                                 channel_affine_rows_avx2, conv_kernel_nchw_avx512};
#else
  static const IsaKernels& avx2 = reference;  // never active (isa_supported() is false): no tiles to list
  static const IsaKernels& avx512 = reference;
#endif
#if ONEBIT_NEON
  static const IsaKernels neon{conv_kernels_neon, pack_rows_neon, pack_row_cl_neon, pack_row_nchw_neon,
                               ternary::chunk_dot_neon, ternary::quantize_token_neon, transpose_block_neon,
                               nullptr, ternary::rows_dot_neon};
  // the same, with the int8 dot products on SDOT (vdotq_s32)
  static const IsaKernels neon_dotprod{conv_kernels_neon, pack_rows_neon, pack_row_cl_neon, pack_row_nchw_neon,
                                       ternary::chunk_dot_neon_dotprod, ternary::quantize_token_neon,
                                       transpose_block_neon, nullptr, ternary::rows_dot_neon_dotprod};
#else
  static const IsaKernels& neon = reference;  // never active (isa_supported() is false): no tiles to list
  static const IsaKernels& neon_dotprod = reference;
#endif
  switch (isa) {
    case Isa::neon_dotprod: return neon_dotprod;
    case Isa::neon: return neon;
    case Isa::avx512: return avx512;
    case Isa::avx2: return avx2;
    case Isa::scalar: return scalar;
    case Isa::reference: return reference;
  }
  return reference;
}

void set_isa(const std::string& name) {
  const Isa isa = parse(name);
  if (!isa_supported(isa)) throw std::invalid_argument("ISA '" + name + "' is not supported by this CPU");
  active().store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace onebit
