// Instruction-set selection for onebit's kernels.
//
// Every kernel has a portable reference implementation and optimized paths.
// The active path is chosen once at import from cpuid (x86-64) or the hardware capabilities
// (aarch64: NEON always, dotprod from getauxval / sysctl), may be forced with the environment
// variable ONEBIT_ISA=avx512|avx2|neon_dotprod|neon|scalar|reference, and may be
// changed at run time with set_isa() (the tests exercise every path this way).
#pragma once
#include <string>
#include <vector>

// The x86-64 kernels (avx2, avx512, the VNNI feature) and cpuid exist only on x86-64; elsewhere
// onebit builds the scalar and reference paths alone.
#if defined(__x86_64__) || defined(_M_X64)
#define ONEBIT_X86 1
#else
#define ONEBIT_X86 0
#endif

namespace onebit {

// The 64-bit ARM kernels (NEON, and SDOT where the core has dotprod) exist only on aarch64.
#if defined(__aarch64__) || defined(_M_ARM64)
#define ONEBIT_NEON 1
#else
#define ONEBIT_NEON 0
#endif

enum class Isa { reference = 0, scalar = 1, avx2 = 2, avx512 = 3, neon = 4, neon_dotprod = 5 };
constexpr int kIsaCount = 6;
// Every ISA, fastest first: the order of supported_isas() and of error messages.
constexpr Isa kIsasFastestFirst[kIsaCount] = {Isa::avx512, Isa::avx2, Isa::neon_dotprod, Isa::neon, Isa::scalar,
                                              Isa::reference};

const char* isa_name(Isa isa);
bool isa_supported(Isa isa);           // can this CPU run it?
std::vector<std::string> supported_isas();
Isa active_isa();
void set_isa(const std::string& name);  // throws std::invalid_argument

// AVX-512 VNNI (vpdpbusd), a feature on top of the avx512 level: the int8 kernels use it when
// the active ISA is avx512 and the CPU has it (forcing avx2 or lower turns it off).
bool has_avx512_vnni();

// A spin-wait hint to the CPU (x86 pause, ARM yield).
inline void cpu_relax() {
#if ONEBIT_X86
  __builtin_ia32_pause();
#elif defined(__aarch64__) || defined(__arm__)
  __asm__ __volatile__("yield");
#endif
}

}  // namespace onebit
