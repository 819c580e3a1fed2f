// Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4, on channels-last float32 data: the
// filter transform, the AVX2 tile transforms of the input and the output, and the register
// tile of the products between them. Shared by the convolutions of conv_winograd_cpu.cpp
// and the native UNet of unet_cpu.cpp, which each lay out their own tiles.
#pragma once

#include "simd.h"

#include <ATen/Functions.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace dvpvae {

constexpr int kLanes = 8;  // floats per AVX2 vector
constexpr int kRows = 6;   // rows per register tile
// Padding of the scratch buffers' per-point stride: a stride of a multiple of 4 KB would map
// a tile's points to the same few L1 sets.
constexpr int kStridePad = 16;

// F(m x m, 3x3) for output tiles of side Mt (2 or 4): an (Mt + 2)^2 input patch per tile and as
// many transformed points.
template <int Mt>
struct Tiling {
  static constexpr int kPatch = Mt + 2;
  static constexpr int kPoints = kPatch * kPatch;
};

// Tiles of side m along an image side of n pixels, the last one partial where m does not divide n.
inline int64_t tile_count(int64_t n, int64_t m) { return (n + m - 1) / m; }

// The filter transforms G (kPatch x 3) of F(2x2, 3x3) and F(4x4, 3x3).
constexpr double G2[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
constexpr double G4[6][3] = {{1.0 / 4, 0, 0},           {-1.0 / 6, -1.0 / 6, -1.0 / 6}, {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                             {1.0 / 24, 1.0 / 12, 1.0 / 6}, {1.0 / 24, -1.0 / 12, 1.0 / 6}, {0, 0, 1}};

// The filter transform as a (kPoints x 9) matrix: T[i P + j, 3 u + v] = G[i][u] G[j][v], so
// that (G g G^T)[e] = sum over the taps t of T[e, t] g[t] and the transform of all filters is
// one product.
template <int Mt>
at::Tensor filter_transform_matrix() {
  constexpr int P = Tiling<Mt>::kPatch;
  const double(*G)[3] = Mt == 2 ? G2 : G4;
  at::Tensor T = at::empty({P * P, 9}, at::TensorOptions().dtype(at::kDouble));
  double* t = T.data_ptr<double>();
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < P; ++j)
      for (int u = 0; u < 3; ++u)
        for (int v = 0; v < 3; ++v) t[(i * P + j) * 9 + 3 * u + v] = G[i][u] * G[j][v];
  return T;
}

// U[e, c, k] = (G g[k, c] G^T)[e] as a (kPoints, C K) float32 tensor, computed in double.
template <int Mt>
at::Tensor transform_filters(const at::Tensor& weight) {
  const int64_t K = weight.size(0), C = weight.size(1);
  const at::Tensor taps = weight.permute({2, 3, 1, 0})  // [t, c, k], one copy
                              .to(at::kDouble, false, false, at::MemoryFormat::Contiguous).view({9, C * K});
  return at::matmul(filter_transform_matrix<Mt>(), taps).to(at::kFloat);
}

#if DVPVAE_HAVE_AVX2_KERNEL
// A tile's input patch d (all channels): row i starts at p + i * rs, column j at + j * C.
struct Patch {
  const float* p;
  int64_t rs;
};

// V[e, r, c : c + 8] = (B^T d B)[e] for the 8 channels at c of patch d.
template <int Mt>
void input_tile(const Patch& d, float* __restrict V, int64_t r, int64_t c, int64_t C, int64_t ldv);

// F(2x2, 3x3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]. Each row of
// B^T d is formed from two patch rows loaded again for it (L1 hits) rather than from all 16
// loads held live, which would not fit the 16 vector registers.
template <>
DVPVAE_AVX2_INLINE void input_tile<2>(const Patch& d, float* __restrict V, int64_t r, int64_t c, int64_t C,
                                      int64_t ldv) {
  // Row i of B^T d is d[ia[i]] + d[ib[i]] where add[i], else d[ia[i]] - d[ib[i]].
  static constexpr int ia[4] = {0, 1, 2, 1}, ib[4] = {2, 2, 1, 3};
  static constexpr bool add[4] = {false, true, false, false};
  float* v = V + r * C + c;
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const float* pa = d.p + ia[i] * d.rs + c;
    const float* pb = d.p + ib[i] * d.rs + c;
    __m256 t[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 a = _mm256_loadu_ps(pa + j * C), b = _mm256_loadu_ps(pb + j * C);
      t[j] = add[i] ? _mm256_add_ps(a, b) : _mm256_sub_ps(a, b);
    }
    _mm256_storeu_ps(v + (i * 4 + 0) * ldv, _mm256_sub_ps(t[0], t[2]));
    _mm256_storeu_ps(v + (i * 4 + 1) * ldv, _mm256_add_ps(t[1], t[2]));
    _mm256_storeu_ps(v + (i * 4 + 2) * ldv, _mm256_sub_ps(t[2], t[1]));
    _mm256_storeu_ps(v + (i * 4 + 3) * ldv, _mm256_sub_ps(t[1], t[3]));
  }
}

// r = B^T d for six vectors d, the 1-D input transform of F(4x4, 3x3) with
// B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
//        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
DVPVAE_AVX2_INLINE void input_transform6(const __m256 (&d)[6], __m256 (&r)[6]) {
  const __m256 two = _mm256_set1_ps(2.f), four = _mm256_set1_ps(4.f), five = _mm256_set1_ps(5.f);
  r[0] = _mm256_fnmadd_ps(five, d[2], _mm256_fmadd_ps(four, d[0], d[4]));
  const __m256 a = _mm256_fnmadd_ps(four, d[2], d[4]), b = _mm256_fnmadd_ps(four, d[1], d[3]);
  r[1] = _mm256_add_ps(a, b);
  r[2] = _mm256_sub_ps(a, b);
  const __m256 e = _mm256_sub_ps(d[4], d[2]), f = _mm256_mul_ps(two, _mm256_sub_ps(d[3], d[1]));
  r[3] = _mm256_add_ps(e, f);
  r[4] = _mm256_sub_ps(e, f);
  r[5] = _mm256_fnmadd_ps(five, d[3], _mm256_fmadd_ps(four, d[1], d[5]));
}

// F(4x4, 3x3): B^T applied down the patch's columns into an L1 buffer, then along its rows.
template <>
DVPVAE_AVX2_INLINE void input_tile<4>(const Patch& d, float* __restrict V, int64_t r, int64_t c, int64_t C,
                                      int64_t ldv) {
  alignas(32) float t[6][6][kLanes];  // B^T d
  for (int j = 0; j < 6; ++j) {
    __m256 col[6], out[6];
    for (int i = 0; i < 6; ++i) col[i] = _mm256_loadu_ps(d.p + i * d.rs + j * C + c);
    input_transform6(col, out);
    for (int i = 0; i < 6; ++i) _mm256_store_ps(t[i][j], out[i]);
  }
  float* v = V + r * C + c;
  for (int i = 0; i < 6; ++i) {
    __m256 row[6], out[6];
    for (int j = 0; j < 6; ++j) row[j] = _mm256_load_ps(t[i][j]);
    input_transform6(row, out);
    for (int j = 0; j < 6; ++j) _mm256_storeu_ps(v + (i * 6 + j) * ldv, out[j]);
  }
}

// out[i, 0 : 8 NV] = (Accumulate ? out[i, 0 : 8 NV] : 0) + sum_j a[i ai + j aj] b[j bj, 0 : 8 NV]
// for R rows i (out rows ldo apart) and `depth` terms j: an R x 8 NV register tile of a product
// whose left operand is broadcast: the inner loop of every Winograd product.
template <int R, int NV, bool Accumulate>
DVPVAE_AVX2_INLINE void register_tile(const float* __restrict a, int64_t ai, int64_t aj, const float* __restrict b,
                                      int64_t bj, float* __restrict out, int64_t ldo, int64_t depth) {
  __m256 acc[R][NV];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      acc[i][v] = Accumulate ? _mm256_loadu_ps(out + i * ldo + v * kLanes) : _mm256_setzero_ps();
  for (int64_t j = 0; j < depth; ++j, a += aj, b += bj) {
    __m256 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm256_loadu_ps(b + v * kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * ai);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + i * ldo + v * kLanes, acc[i][v]);
}

// register_tile over the `cols` columns of out and b: 16 at a time, then 8.
template <int R, bool Accumulate>
DVPVAE_AVX2_INLINE void register_tiles(const float* __restrict a, int64_t ai, int64_t aj, const float* __restrict b,
                                       int64_t bj, float* __restrict out, int64_t ldo, int64_t depth, int64_t cols) {
  int64_t n = 0;
  for (; n + 2 * kLanes <= cols; n += 2 * kLanes)
    register_tile<R, 2, Accumulate>(a, ai, aj, b + n, bj, out + n, ldo, depth);
  if (n < cols) register_tile<R, 1, Accumulate>(a, ai, aj, b + n, bj, out + n, ldo, depth);
}

// register_tile with 16-float vectors: R x 16 NV accumulators of AVX-512's 32 registers;
// the broadcast operand folds into each FMA. Columns past `cols` (< 16 NV) are masked off.
template <int R, int NV, bool Accumulate>
DVPVAE_AVX512_INLINE void register_tile16(const float* __restrict a, int64_t ai, int64_t aj,
                                          const float* __restrict b, int64_t bj, float* __restrict out, int64_t ldo,
                                          int64_t depth, __mmask16 last) {
  constexpr __mmask16 all = 0xffff;
  __m512 acc[R][NV];
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v)
      acc[i][v] = Accumulate ? _mm512_maskz_loadu_ps(v == NV - 1 ? last : all, out + i * ldo + v * 16)
                             : _mm512_setzero_ps();
  for (int64_t j = 0; j < depth; ++j, a += aj, b += bj) {
    __m512 bv[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : all, b + v * 16);
#pragma GCC unroll 12
    for (int i = 0; i < R; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * ai]);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(av, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + i * ldo + v * 16, v == NV - 1 ? last : all, acc[i][v]);
}

// register_tile16 over `rows` rows (an even count), 12 at a time (24 of the 32 registers),
// and over the columns, 32 then 16 at a time, the last block masked.
template <bool Accumulate>
DVPVAE_AVX512 __attribute__((noinline)) void row_products16(const float* a, int64_t ai, int64_t aj, const float* b,
                                                          int64_t bj, float* out, int64_t ldo, int64_t depth,
                                                          int64_t cols, int64_t rows) {
  for (int64_t n = 0; n < cols; n += 32) {
    const int64_t width = std::min<int64_t>(32, cols - n);
    const __mmask16 last = static_cast<__mmask16>((1u << ((width - 1) % 16 + 1)) - 1);
    const float* bn = b + n;
    int64_t i = 0;
    for (; i + 12 <= rows; i += 12) {
      if (width > 16)
        register_tile16<12, 2, Accumulate>(a + i * ai, ai, aj, bn, bj, out + i * ldo + n, ldo, depth, last);
      else
        register_tile16<12, 1, Accumulate>(a + i * ai, ai, aj, bn, bj, out + i * ldo + n, ldo, depth, last);
    }
    for (; i < rows; i += 2) {
      if (width > 16)
        register_tile16<2, 2, Accumulate>(a + i * ai, ai, aj, bn, bj, out + i * ldo + n, ldo, depth, last);
      else
        register_tile16<2, 1, Accumulate>(a + i * ai, ai, aj, bn, bj, out + i * ldo + n, ldo, depth, last);
    }
  }
}

// register_tiles over `rows` rows (an even count): kRows at a time, then 4 and 2.
template <bool Accumulate>
DVPVAE_AVX2 __attribute__((noinline)) void row_products8(const float* a, int64_t ai, int64_t aj, const float* b,
                                                       int64_t bj, float* out, int64_t ldo, int64_t depth,
                                                       int64_t cols, int64_t rows) {
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    register_tiles<kRows, Accumulate>(a + i * ai, ai, aj, b, bj, out + i * ldo, ldo, depth, cols);
  if (i + 4 <= rows) {
    register_tiles<4, Accumulate>(a + i * ai, ai, aj, b, bj, out + i * ldo, ldo, depth, cols);
    i += 4;
  }
  if (i + 2 <= rows) register_tiles<2, Accumulate>(a + i * ai, ai, aj, b, bj, out + i * ldo, ldo, depth, cols);
}

// out[i, 0 : cols] = (Accumulate ? out[i, 0 : cols] : 0) + sum_j a[i ai + j aj] b[j bj, 0 : cols]
// for an even number of rows i and cols % 8 == 0, in 16-float vectors where the CPU has them.
// Each element is one chain of FMAs over j in order, so the result is the same bits for
// every tiling and vector width.
template <bool Accumulate>
inline void row_products(const float* a, int64_t ai, int64_t aj, const float* b, int64_t bj, float* out, int64_t ldo,
                         int64_t depth, int64_t cols, int64_t rows) {
  (cpu_has_avx512f() ? row_products16<Accumulate> : row_products8<Accumulate>)(a, ai, aj, b, bj, out, ldo, depth,
                                                                               cols, rows);
}

// y[i][j] = (A^T m A)[i, j] for the 8 channels at m of a tile's points (ldm floats apart).
template <int Mt>
void output_transform(const float* __restrict m, int64_t ldm, __m256 (&y)[Mt][Mt]);

// F(2x2, 3x3): A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
template <>
DVPVAE_AVX2_INLINE void output_transform<2>(const float* __restrict m, int64_t ldm, __m256 (&y)[2][2]) {
  __m256 q[2][4];  // A^T m, formed column by column so that at most 12 vectors are live
  for (int j = 0; j < 4; ++j) {
    const __m256 p0 = _mm256_loadu_ps(m + j * ldm), p1 = _mm256_loadu_ps(m + (4 + j) * ldm);
    const __m256 p2 = _mm256_loadu_ps(m + (8 + j) * ldm), p3 = _mm256_loadu_ps(m + (12 + j) * ldm);
    q[0][j] = _mm256_add_ps(_mm256_add_ps(p0, p1), p2);
    q[1][j] = _mm256_sub_ps(_mm256_sub_ps(p1, p2), p3);
  }
  for (int i = 0; i < 2; ++i) {
    y[i][0] = _mm256_add_ps(_mm256_add_ps(q[i][0], q[i][1]), q[i][2]);
    y[i][1] = _mm256_sub_ps(_mm256_sub_ps(q[i][1], q[i][2]), q[i][3]);
  }
}

// o = A^T m for six vectors m, the 1-D output transform of F(4x4, 3x3) with
// A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
DVPVAE_AVX2_INLINE void output_transform6(const __m256 (&m)[6], __m256 (&o)[4]) {
  const __m256 s12 = _mm256_add_ps(m[1], m[2]), d12 = _mm256_sub_ps(m[1], m[2]);
  const __m256 s34 = _mm256_add_ps(m[3], m[4]), d34 = _mm256_sub_ps(m[3], m[4]);
  o[0] = _mm256_add_ps(_mm256_add_ps(m[0], s12), s34);
  o[1] = _mm256_fmadd_ps(_mm256_set1_ps(2.f), d34, d12);
  o[2] = _mm256_fmadd_ps(_mm256_set1_ps(4.f), s34, s12);
  o[3] = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(8.f), d34, d12), m[5]);
}

// F(4x4, 3x3): A^T applied down the points' columns into an L1 buffer, then along its rows.
template <>
DVPVAE_AVX2_INLINE void output_transform<4>(const float* __restrict m, int64_t ldm, __m256 (&y)[4][4]) {
  alignas(32) float t[4][6][kLanes];  // A^T m
  for (int j = 0; j < 6; ++j) {
    __m256 col[6], q[4];
    for (int i = 0; i < 6; ++i) col[i] = _mm256_loadu_ps(m + (i * 6 + j) * ldm);
    output_transform6(col, q);
    for (int i = 0; i < 4; ++i) _mm256_store_ps(t[i][j], q[i]);
  }
  for (int i = 0; i < 4; ++i) {
    __m256 row[6];
    for (int j = 0; j < 6; ++j) row[j] = _mm256_load_ps(t[i][j]);
    output_transform6(row, y[i]);
  }
}

// out[i ld_row + j ld_pixel, 0 : 8] = (A^T m A)[i, j] + bias[0 : 8] (0 without bias), plus
// res[i ld_row + j ld_pixel, 0 : 8] where res is given, for the tile's first rows x cols
// pixels: fewer than Mt where the tile reaches past the image's last row or column.
template <int Mt>
DVPVAE_AVX2_INLINE void store_output_tile(const float* __restrict m, int64_t ldm, const float* __restrict bias,
                                          const float* __restrict res, float* __restrict out, int64_t ld_row,
                                          int64_t ld_pixel, int64_t rows, int64_t cols) {
  __m256 y[Mt][Mt];
  output_transform<Mt>(m, ldm, y);
  const __m256 b = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  for (int i = 0; i < Mt && i < rows; ++i)
    for (int j = 0; j < Mt && j < cols; ++j) {
      const int64_t o = i * ld_row + j * ld_pixel;
      const __m256 v = _mm256_add_ps(y[i][j], b);
      _mm256_storeu_ps(out + o, res ? _mm256_add_ps(_mm256_loadu_ps(res + o), v) : v);
    }
}
#endif

}  // namespace dvpvae
