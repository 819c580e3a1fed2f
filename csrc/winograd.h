// Winograd's minimal filtering F(m x m, 3x3), m = 2 or 4, on channels-last float32 data: the
// filter transform, the tile transforms of the input and the output (in 8- or 16-float
// vectors), and the register tiles of the products between them. Shared by the convolutions
// of conv_winograd_cpu.cpp and the native UNet of unet_cpu.cpp, which each lay out their own
// tiles.
#pragma once

#include "simd.h"

#include <ATen/Functions.h>

#include <algorithm>
#include <cstdint>

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

// r = B^T d for six vectors d, the 1-D input transform of F(4x4, 3x3) with
// B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
//        [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
template <typename V>
DVPVAE_INLINE void input_transform6(const V (&d)[6], V (&r)[6]) {
  r[0] = (d[0] * 4.f + d[4]) - d[2] * 5.f;
  const V a = d[4] - d[2] * 4.f, b = d[3] - d[1] * 4.f;
  r[1] = a + b;
  r[2] = a - b;
  const V e = d[4] - d[2], f = (d[3] - d[1]) * 2.f;
  r[3] = e + f;
  r[4] = e - f;
  r[5] = (d[1] * 4.f + d[5]) - d[3] * 5.f;
}

// V[e, r, c : c + w] = (B^T d B)[e] for the w = kWidth<Vec> channels at c of patch d.
// F(2x2, 3x3): B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]; each row of
// B^T d is formed from two patch rows loaded again for it (L1 hits) rather than from all 16
// loads held live, which would not fit AVX2's 16 vector registers. F(4x4, 3x3): B^T applied
// down the patch's columns into an L1 buffer, then along its rows.
template <int Mt, typename Vec>
DVPVAE_INLINE void input_tile(const Patch& d, float* __restrict V, int64_t r, int64_t c, int64_t C, int64_t ldv) {
  float* v = V + r * C + c;
  if constexpr (Mt == 2) {
    // Row i of B^T d is d[ia[i]] + d[ib[i]] where add[i], else d[ia[i]] - d[ib[i]].
    constexpr int ia[4] = {0, 1, 2, 1}, ib[4] = {2, 2, 1, 3};
    constexpr bool add[4] = {false, true, false, false};
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      const float* pa = d.p + ia[i] * d.rs + c;
      const float* pb = d.p + ib[i] * d.rs + c;
      Vec t[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const Vec a = load<Vec>(pa + j * C), b = load<Vec>(pb + j * C);
        t[j] = add[i] ? a + b : a - b;
      }
      store(v + (i * 4 + 0) * ldv, t[0] - t[2]);
      store(v + (i * 4 + 1) * ldv, t[1] + t[2]);
      store(v + (i * 4 + 2) * ldv, t[2] - t[1]);
      store(v + (i * 4 + 3) * ldv, t[1] - t[3]);
    }
  } else {
    static_assert(Mt == 4);
    alignas(64) float t[6][6][kWidth<Vec>];  // B^T d
    for (int j = 0; j < 6; ++j) {
      Vec col[6], out[6];
      for (int i = 0; i < 6; ++i) col[i] = load<Vec>(d.p + i * d.rs + j * C + c);
      input_transform6(col, out);
      for (int i = 0; i < 6; ++i) store(t[i][j], out[i]);
    }
    for (int i = 0; i < 6; ++i) {
      Vec row[6], out[6];
      for (int j = 0; j < 6; ++j) row[j] = load<Vec>(t[i][j]);
      input_transform6(row, out);
      for (int j = 0; j < 6; ++j) store(v + (i * 6 + j) * ldv, out[j]);
    }
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

// register_tile with 16-float vectors: R x 16 NV accumulators of AVX-512's 32 registers.
// Columns past `cols` (< 16 NV) are masked off. Intrinsics, not vector types, for this
// inner loop: GCC then broadcasts the left operand straight from memory, not through a
// shuffle that competes with the FMAs for a port.
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

// register_tile16 on R rows and `width` (<= 32) columns: two vectors per row where width > 16,
// else one; the last vector masked to `last`.
template <int R, bool Accumulate>
DVPVAE_AVX512_INLINE void column_block16(const float* a, int64_t ai, int64_t aj, const float* b, int64_t bj,
                                         float* out, int64_t ldo, int64_t depth, int64_t width, __mmask16 last) {
  if (width > 16)
    register_tile16<R, 2, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, last);
  else
    register_tile16<R, 1, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, last);
}

// register_tile16 over `rows` rows, 12 at a time (24 of the 32 registers), then 8, 2 and 1,
// and over the columns, 32 then 16 at a time, the last block masked.
template <bool Accumulate>
DVPVAE_AVX512 __attribute__((noinline)) void row_products16(const float* a, int64_t ai, int64_t aj, const float* b,
                                                          int64_t bj, float* out, int64_t ldo, int64_t depth,
                                                          int64_t cols, int64_t rows) {
  for (int64_t n = 0; n < cols; n += 32) {
    const int64_t width = std::min<int64_t>(32, cols - n);
    const __mmask16 last = static_cast<__mmask16>((1u << ((width - 1) % 16 + 1)) - 1);
    int64_t i = 0;
    for (; i + 12 <= rows; i += 12)
      column_block16<12, Accumulate>(a + i * ai, ai, aj, b + n, bj, out + i * ldo + n, ldo, depth, width, last);
    if (i + 8 <= rows) {
      column_block16<8, Accumulate>(a + i * ai, ai, aj, b + n, bj, out + i * ldo + n, ldo, depth, width, last);
      i += 8;
    }
    for (; i + 2 <= rows; i += 2)
      column_block16<2, Accumulate>(a + i * ai, ai, aj, b + n, bj, out + i * ldo + n, ldo, depth, width, last);
    if (i < rows)
      column_block16<1, Accumulate>(a + i * ai, ai, aj, b + n, bj, out + i * ldo + n, ldo, depth, width, last);
  }
}

// register_tiles over `rows` rows: kRows at a time, then the rest in one tile.
template <bool Accumulate>
DVPVAE_AVX2 __attribute__((noinline)) void row_products8(const float* a, int64_t ai, int64_t aj, const float* b,
                                                       int64_t bj, float* out, int64_t ldo, int64_t depth,
                                                       int64_t cols, int64_t rows) {
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    register_tiles<kRows, Accumulate>(a + i * ai, ai, aj, b, bj, out + i * ldo, ldo, depth, cols);
  a += i * ai;
  out += i * ldo;
  static_assert(kRows == 6);
  switch (rows - i) {
    case 5: register_tiles<5, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, cols); break;
    case 4: register_tiles<4, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, cols); break;
    case 3: register_tiles<3, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, cols); break;
    case 2: register_tiles<2, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, cols); break;
    case 1: register_tiles<1, Accumulate>(a, ai, aj, b, bj, out, ldo, depth, cols); break;
  }
}

// out[i, 0 : cols] = (Accumulate ? out[i, 0 : cols] : 0) + sum_j a[i ai + j aj] b[j bj, 0 : cols]
// for `rows` rows i and cols % 8 == 0, in 16-float vectors where the CPU has them. Each
// element is one chain of FMAs over j in order, so the result is the same bits for every
// tiling and vector width.
template <bool Accumulate>
inline void row_products(const float* a, int64_t ai, int64_t aj, const float* b, int64_t bj, float* out, int64_t ldo,
                         int64_t depth, int64_t cols, int64_t rows) {
  (cpu_has_avx512f() ? row_products16<Accumulate> : row_products8<Accumulate>)(a, ai, aj, b, bj, out, ldo, depth,
                                                                               cols, rows);
}

// o = A^T m for six vectors m, the 1-D output transform of F(4x4, 3x3) with
// A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
template <typename V>
DVPVAE_INLINE void output_transform6(const V (&m)[6], V (&o)[4]) {
  const V s12 = m[1] + m[2], d12 = m[1] - m[2], s34 = m[3] + m[4], d34 = m[3] - m[4];
  o[0] = (m[0] + s12) + s34;
  o[1] = d34 * 2.f + d12;
  o[2] = s34 * 4.f + s12;
  o[3] = (d34 * 8.f + d12) + m[5];
}

// y[i][j] = (A^T m A)[i, j] for the kWidth<V> channels at m of a tile's points (ldm floats
// apart). F(2x2, 3x3): A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], formed column by column so that
// at most 12 vectors are live. F(4x4, 3x3): A^T applied down the points' columns into an L1
// buffer, then along its rows.
template <int Mt, typename V>
DVPVAE_INLINE void output_transform(const float* __restrict m, int64_t ldm, V (&y)[Mt][Mt]) {
  if constexpr (Mt == 2) {
    V q[2][4];  // A^T m
    for (int j = 0; j < 4; ++j) {
      const V p0 = load<V>(m + j * ldm), p1 = load<V>(m + (4 + j) * ldm);
      const V p2 = load<V>(m + (8 + j) * ldm), p3 = load<V>(m + (12 + j) * ldm);
      q[0][j] = (p0 + p1) + p2;
      q[1][j] = (p1 - p2) - p3;
    }
    for (int i = 0; i < 2; ++i) {
      y[i][0] = (q[i][0] + q[i][1]) + q[i][2];
      y[i][1] = (q[i][1] - q[i][2]) - q[i][3];
    }
  } else {
    static_assert(Mt == 4);
    alignas(64) float t[4][6][kWidth<V>];  // A^T m
    for (int j = 0; j < 6; ++j) {
      V col[6], q[4];
      for (int i = 0; i < 6; ++i) col[i] = load<V>(m + (i * 6 + j) * ldm);
      output_transform6(col, q);
      for (int i = 0; i < 4; ++i) store(t[i][j], q[i]);
    }
    for (int i = 0; i < 4; ++i) {
      V row[6];
      for (int j = 0; j < 6; ++j) row[j] = load<V>(t[i][j]);
      output_transform6(row, y[i]);
    }
  }
}

// out[i ld_row + j ld_pixel, 0 : w] = (A^T m A)[i, j] + bias[0 : w] (0 without bias), plus
// res[i ld_row + j ld_pixel, 0 : w] where res is given, for w = kWidth<V> channels and the
// tile's first rows x cols pixels: fewer than Mt where the tile reaches past the image's
// last row or column.
template <int Mt, typename V>
DVPVAE_INLINE void store_output_tile(const float* __restrict m, int64_t ldm, const float* __restrict bias,
                                     const float* __restrict res, float* __restrict out, int64_t ld_row,
                                     int64_t ld_pixel, int64_t rows, int64_t cols) {
  V y[Mt][Mt];
  output_transform<Mt>(m, ldm, y);
  const V b = bias ? load<V>(bias) : V{};
  for (int i = 0; i < Mt && i < rows; ++i)
    for (int j = 0; j < Mt && j < cols; ++j) {
      const int64_t o = i * ld_row + j * ld_pixel;
      const V v = y[i][j] + b;
      store(out + o, res ? load<V>(res + o) + v : v);
    }
}
#endif

}  // namespace dvpvae
