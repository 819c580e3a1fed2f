// The x86 gates of the extension's hand-vectorised kernels: they are compiled behind target
// attributes (the rest of the extension is built for the baseline ISA) and called only
// after a run-time check of the CPU.
#pragma once

#include <cstring>

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

#define DVPVAE_INLINE inline __attribute__((always_inline))

namespace dvpvae {

// GCC vector types of one AVX2 (8 floats) and one AVX-512 (16 floats) register. Code written
// with them compiles to the ISA of the function it is inlined into.
typedef float vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vec16 __attribute__((vector_size(16 * sizeof(float))));
template <typename V>
constexpr int kWidth = sizeof(V) / sizeof(float);

template <typename V>
DVPVAE_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
DVPVAE_INLINE void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }

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
