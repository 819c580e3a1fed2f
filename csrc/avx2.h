// The AVX2/FMA gate of the extension's hand-vectorised convolution kernels: they are compiled
// behind a target attribute (the rest of the extension is built for the baseline ISA) and
// called only after a run-time check of the CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DVPVAE_HAVE_AVX2_KERNEL 1
#define DVPVAE_AVX2 __attribute__((target("avx2,fma")))
#define DVPVAE_AVX2_INLINE DVPVAE_AVX2 inline __attribute__((always_inline))
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
