// What the hand-vectorised CPU kernels share: the AVX2/FMA target attribute (the rest of the
// extension is built for the baseline ISA) and the run-time check that the CPU has it.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DVPVAE_HAVE_AVX2_KERNEL 1
#define DVPVAE_AVX2 __attribute__((target("avx2,fma")))
#else
#define DVPVAE_HAVE_AVX2_KERNEL 0
#endif

namespace dvpvae {

inline bool cpu_has_avx2_fma() {
#if DVPVAE_HAVE_AVX2_KERNEL
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

}  // namespace dvpvae
