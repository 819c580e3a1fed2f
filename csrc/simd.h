// The x86 gates of the extension's hand-vectorised kernels: they are compiled behind target
// attributes (the rest of the extension is built for the baseline ISA) and called only
// after a run-time check of the CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DVPVAE_HAVE_AVX2_KERNEL 1
#define DVPVAE_AVX2 __attribute__((target("avx2,fma")))
#define DVPVAE_AVX2_INLINE DVPVAE_AVX2 inline __attribute__((always_inline))
#define DVPVAE_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define DVPVAE_AVX512_INLINE DVPVAE_AVX512 inline __attribute__((always_inline))
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

// Whether 16-float vectors (AVX-512F) are available, checked once.
inline bool cpu_has_avx512f() {
#if DVPVAE_HAVE_AVX2_KERNEL
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

}  // namespace dvpvae
