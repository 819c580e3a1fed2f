// A stride-1 3x3 convolution with zero-padding 1 on channels-last float32 tensors by
// Winograd's minimal filtering F(m x m, 3x3) (Lavin & Gray, 2016), m = 2 or 4: each m x m
// output tile is
//
//   Y = A^T [ (G g G^T) . (B^T d B) ] A
//
// for the tile's (m + 2)^2 input patch d (rows m ty - 1 .., columns m tx - 1 ..) and each 3x3
// filter g, where . is the elementwise product summed over input channels. That sum is
// (m + 2)^2 independent (tiles x C) @ (C x K) products: 4 multiplies per output pixel and
// channel pair for m = 2, 2.25 for m = 4, instead of the direct form's 9. F(2x2, 3x3)'s
// transforms only add and subtract, so it matches the direct convolution to float32 round-off;
// F(4x4, 3x3)'s transforms scale by up to 8 (and G by 1/24), so its rounding is about 20 times
// larger, within 1e-5 of sum |x| |w| (the tests bound both forms).
//
// The weight gradient uses the same tiles and transforms (see winograd_weight_grad's kernels
// below).
//
// Work items are blocks of kBlock<m> tiles (image-major, then tile rows, then tile
// columns). Each thread transforms a block's patches into a buffer that stays in L2,
// multiplies it with the transformed filters (row_products: 16-float vectors on AVX-512
// CPUs, 8-float ones on AVX2) and writes the block's outputs, so the transformed data never
// reaches DRAM.

#include "winograd.h"
#include "ops.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace dvpvae {
namespace {

constexpr int kAhead = 4;         // tiles between a prefetch and the tile's transform
constexpr int kFlushBlocks = 16;  // weight gradient: blocks summed in float32 before a double sum
// Weight gradient: tiles per block, the depth of its products (its transforms, 2 x 36 x 48 x C
// floats at F(4x4, 3x3), stay in L2).
constexpr int kWgradBlock = 48;

// Tiles per work item, so that a block's transformed input and products (kPoints x kBlock x
// channels each) stay in L2; a multiple of the register tiles' rows (6 with AVX2, 12 with AVX-512).
template <int Mt>
constexpr int kBlock = Mt == 2 ? 48 : 24;

struct Shape {
  int64_t N, H, W, C, K, TH, TW;  // batch, image, channels in and out, tiles per column and row
};

// The shape of an F(Mt x Mt, 3x3) convolution: partial tiles cover the image's last rows and columns.
template <int Mt>
Shape tiled_shape(int64_t N, int64_t H, int64_t W, int64_t C, int64_t K) {
  return {N, H, W, C, K, tile_count(H, Mt), tile_count(W, Mt)};
}

// Whether the 16-float (AVX-512) transforms serve this shape: both channel counts are
// multiples of 16; the 8-float (AVX2) ones serve the rest.
inline bool wide_transforms(const Shape& s) { return cpu_has_avx512f() && s.C % 16 == 0 && s.K % 16 == 0; }

#if DVPVAE_HAVE_AVX2_KERNEL
// The patch of tile (n, ty, tx): in x for an interior tile, else copied with its zero padding
// into `pad` (kPoints C floats), so that the tile transforms never test bounds.
template <int Mt>
DVPVAE_INLINE Patch input_patch(const float* __restrict x, const Shape& s, int64_t n, int64_t ty, int64_t tx,
                                float* __restrict pad) {
  constexpr int P = Tiling<Mt>::kPatch;
  const int64_t y0 = Mt * ty - 1, x0 = Mt * tx - 1;
  const float* img = x + n * s.H * s.W * s.C;
  if (y0 >= 0 && x0 >= 0 && y0 + P <= s.H && x0 + P <= s.W) return {img + (y0 * s.W + x0) * s.C, s.W * s.C};
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < P; ++j) {
      const int64_t y = y0 + i, xx = x0 + j;
      float* d = pad + (i * P + j) * s.C;
      const bool inside = y >= 0 && y < s.H && xx >= 0 && xx < s.W;
      if (inside)
        std::copy_n(img + (y * s.W + xx) * s.C, s.C, d);
      else
        std::fill_n(d, s.C, 0.f);
    }
  return {pad, P * s.C};
}

// Tile coordinates (n, ty, tx) walked in order without a division per tile.
struct TileWalk {
  int64_t n, ty, tx;
  TileWalk(const Shape& s, int64_t t) : n(t / (s.TH * s.TW)), ty(t % (s.TH * s.TW) / s.TW), tx(t % s.TW) {}
  void next(const Shape& s) {
    if (++tx < s.TW) return;
    tx = 0;
    if (++ty < s.TH) return;
    ty = 0;
    ++n;
  }
};

// Prefetches the input patch of the tile at `w` and, with g, its output-gradient tile. Called
// kAhead tiles early: each tile row starts new short streams (a few cache lines per image
// row) that the hardware prefetchers pick up too late.
template <int Mt>
DVPVAE_INLINE void prefetch_tile(const float* x, const float* g, const Shape& s, const TileWalk& w) {
  if (w.n >= s.N) return;
  constexpr int P = Tiling<Mt>::kPatch;
  const int64_t y0 = Mt * w.ty - 1, x0 = std::max<int64_t>(Mt * w.tx - 1, 0);
  const int64_t x1 = std::min<int64_t>(Mt * w.tx - 1 + P, s.W);
  for (int64_t y = std::max<int64_t>(y0, 0); y < std::min<int64_t>(y0 + P, s.H); ++y) {
    const char* row = reinterpret_cast<const char*>(x + ((w.n * s.H + y) * s.W + x0) * s.C);
    for (int64_t b = 0; b < (x1 - x0) * s.C * 4; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
  if (g == nullptr) return;
  const int64_t gx1 = std::min<int64_t>(Mt * w.tx + Mt, s.W);
  for (int64_t y = Mt * w.ty; y < std::min<int64_t>(Mt * w.ty + Mt, s.H); ++y) {
    const char* row = reinterpret_cast<const char*>(g + ((w.n * s.H + y) * s.W + Mt * w.tx) * s.K);
    for (int64_t b = 0; b < (gx1 - Mt * w.tx) * s.K * 4; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
  }
}

// The tiles [t0, t0 + count) of the whole batch, count <= kBlock, with the transforms in
// vectors of type Vec (the channel counts are multiples of its width); V, M and pad are scratch.
template <int Mt, typename Vec>
DVPVAE_INLINE void tile_block(const float* __restrict x, const float* __restrict U, const float* __restrict bias,
                              float* __restrict out, float* __restrict V, float* __restrict M, float* __restrict pad,
                              const Shape& s, int64_t t0, int64_t count) {
  constexpr int kPoints = Tiling<Mt>::kPoints;
  const int64_t ldv = kBlock<Mt> * s.C + kStridePad, ldm = kBlock<Mt> * s.K + kStridePad;
  TileWalk in(s, t0), ahead(s, t0 + kAhead);
  for (int64_t r = 0; r < count; ++r, in.next(s), ahead.next(s)) {
    prefetch_tile<Mt>(x, nullptr, s, ahead);
    const Patch d = input_patch<Mt>(x, s, in.n, in.ty, in.tx, pad);
    for (int64_t c = 0; c < s.C; c += kWidth<Vec>) input_tile<Mt, Vec>(d, V, r, c, s.C, ldv);
  }
  for (int e = 0; e < kPoints; ++e) {
    const float* Ve = V + e * ldv;
    const float* Ue = U + e * s.C * s.K;
    float* Me = M + e * ldm;
    row_products<false>(Ve, s.C, 1, Ue, s.K, Me, s.K, s.C, s.K, count);  // M = V @ U
  }
  TileWalk o(s, t0);
  for (int64_t r = 0; r < count; ++r, o.next(s)) {
    float* tile_out = out + ((o.n * s.H + Mt * o.ty) * s.W + Mt * o.tx) * s.K;
    for (int64_t k = 0; k < s.K; k += kWidth<Vec>)
      store_output_tile<Mt, Vec>(M + r * s.K + k, ldm, bias ? bias + k : nullptr, nullptr, tile_out + k, s.W * s.K,
                                 s.K, s.H - Mt * o.ty, s.W - Mt * o.tx);
  }
}

// tile_block compiled for AVX2 (8-float transforms) and for AVX-512 (16-float ones).
template <int Mt>
DVPVAE_AVX2 void tile_block8(const float* x, const float* U, const float* bias, float* out, float* V, float* M,
                             float* pad, const Shape& s, int64_t t0, int64_t count) {
  tile_block<Mt, vec8>(x, U, bias, out, V, M, pad, s, t0, count);
}
template <int Mt>
DVPVAE_AVX512 void tile_block16(const float* x, const float* U, const float* bias, float* out, float* V, float* M,
                                float* pad, const Shape& s, int64_t t0, int64_t count) {
  tile_block<Mt, vec16>(x, U, bias, out, V, M, pad, s, t0, count);
}

// ---------------------------------------------------------------- weight and bias gradients
// dW = G^T [ sum over tiles of (A dY A^T) . (B^T d B) ] G for each (out, in) channel pair, where
// dY is a tile's Mt x Mt output gradient and d its input patch: the weight gradient of the
// form above (its trilinear sum over dY, g and d differentiated in g). The tile sum is kPoints
// (K x tiles) @ (tiles x C) products; db is the sum of the (1, 1) point of A dY A^T, which is
// the tile's sum of dY (row 1 of A is all ones).

// r = A q for Mt vectors q down an output-gradient tile's column or along its row. F(2x2, 3x3):
// A = [[1, 0], [1, 1], [1, -1], [0, -1]]; F(4x4, 3x3): A = [[1, 0, 0, 0], [1, 1, 1, 1],
// [1, -1, 1, -1], [1, 2, 4, 8], [1, -2, 4, -8], [0, 0, 0, 1]], the transposes of A^T above.
template <int Mt, typename V>
DVPVAE_INLINE void grad_transform(const V (&q)[Mt], V (&r)[Mt + 2]) {
  if constexpr (Mt == 2) {
    r[0] = q[0];
    r[1] = q[0] + q[1];
    r[2] = q[0] - q[1];
    r[3] = V{} - q[1];
  } else {
    static_assert(Mt == 4);
    const V s02 = q[0] + q[2], s13 = q[1] + q[3];
    const V t02 = q[0] + q[2] * 4.f, t13 = (q[1] + q[3] * 4.f) * 2.f;
    r[0] = q[0];
    r[1] = s02 + s13;
    r[2] = s02 - s13;
    r[3] = t02 + t13;
    r[4] = t02 - t13;
    r[5] = q[3];
  }
}

// D[e, r, k : k + w] = (A q A^T)[e] for the w = kWidth<Vec> channels at k of the
// output-gradient tile (n, ty, tx), zero past the image edge: A down the tile's columns into
// an L1 buffer, then along its rows.
template <int Mt, typename Vec>
DVPVAE_INLINE void grad_tile(const float* __restrict g, float* __restrict D, const Shape& s, int64_t n, int64_t ty,
                             int64_t tx, int64_t r, int64_t k, int64_t ldd) {
  constexpr int P = Tiling<Mt>::kPatch;
  const float* base = g + n * s.H * s.W * s.K + k;
  alignas(64) float t[P][Mt][kWidth<Vec>];  // A q
  for (int j = 0; j < Mt; ++j) {
    Vec col[Mt], out[P];
    for (int i = 0; i < Mt; ++i) {
      const int64_t y = Mt * ty + i, xx = Mt * tx + j;
      col[i] = (y < s.H && xx < s.W) ? load<Vec>(base + (y * s.W + xx) * s.K) : Vec{};
    }
    grad_transform<Mt>(col, out);
    for (int i = 0; i < P; ++i) store(t[i][j], out[i]);
  }
  float* d = D + r * s.K + k;
  for (int i = 0; i < P; ++i) {
    Vec row[Mt], out[P];
    for (int j = 0; j < Mt; ++j) row[j] = load<Vec>(t[i][j]);
    grad_transform<Mt>(row, out);
    for (int j = 0; j < P; ++j) store(d + (i * P + j) * ldd, out[j]);
  }
}

// Accumulates the tiles [t0, t0 + count) into S (kPoints, K, C) and bias (K), with the
// transforms in vectors of type Vec (the channel counts are multiples of its width); V, D and
// pad are scratch.
template <int Mt, typename Vec>
DVPVAE_INLINE void wgrad_block(const float* __restrict x, const float* __restrict g, float* __restrict V,
                               float* __restrict D, float* __restrict pad, float* __restrict S,
                               float* __restrict bias, const Shape& s, int64_t t0, int64_t count) {
  constexpr int w = kWidth<Vec>, kPoints = Tiling<Mt>::kPoints;
  const int64_t ldv = kWgradBlock * s.C + kStridePad, ldd = kWgradBlock * s.K + kStridePad;
  TileWalk t(s, t0), ahead(s, t0 + kAhead);
  for (int64_t r = 0; r < count; ++r, t.next(s), ahead.next(s)) {
    prefetch_tile<Mt>(x, g, s, ahead);
    const Patch d = input_patch<Mt>(x, s, t.n, t.ty, t.tx, pad);
    for (int64_t c = 0; c < s.C; c += w) input_tile<Mt, Vec>(d, V, r, c, s.C, ldv);
    for (int64_t k = 0; k < s.K; k += w) grad_tile<Mt, Vec>(g, D, s, t.n, t.ty, t.tx, r, k, ldd);
  }
  for (int e = 0; e < kPoints; ++e) {
    const float* De = D + e * ldd;
    const float* Ve = V + e * ldv;
    float* Se = S + e * s.K * s.C;
    // S[k, :] += sum over the tiles r of D[r, k] V[r, :]
    row_products<true>(De, 1, s.K, Ve, s.C, Se, s.C, count, s.C, s.K);
  }
  const float* D11 = D + (Tiling<Mt>::kPatch + 1) * ldd;  // the (1, 1) point: each tile's sum of dY
  for (int64_t k = 0; k < s.K; k += w) {
    Vec sum = load<Vec>(bias + k);
    for (int64_t r = 0; r < count; ++r) sum += load<Vec>(D11 + r * s.K + k);
    store(bias + k, sum);
  }
}

// wgrad_block compiled for AVX2 (8-float transforms) and for AVX-512 (16-float ones).
template <int Mt>
DVPVAE_AVX2 void wgrad_block8(const float* x, const float* g, float* V, float* D, float* pad, float* S, float* bias,
                              const Shape& s, int64_t t0, int64_t count) {
  wgrad_block<Mt, vec8>(x, g, V, D, pad, S, bias, s, t0, count);
}
template <int Mt>
DVPVAE_AVX512 void wgrad_block16(const float* x, const float* g, float* V, float* D, float* pad, float* S,
                                 float* bias, const Shape& s, int64_t t0, int64_t count) {
  wgrad_block<Mt, vec16>(x, g, V, D, pad, S, bias, s, t0, count);
}

// out = conv(x, weight) + bias by F(Mt x Mt, 3x3), each thread on whole blocks of tiles.
template <int Mt>
void winograd_forward(const float* x, const at::Tensor& weight, const float* bias, float* out, int64_t N, int64_t H,
                      int64_t W) {
  using T = Tiling<Mt>;
  const int64_t C = weight.size(1), K = weight.size(0);
  const Shape s = tiled_shape<Mt>(N, H, W, C, K);
  const at::Tensor U = transform_filters<Mt>(weight);
  const int64_t tiles = N * s.TH * s.TW, blocks = (tiles + kBlock<Mt> - 1) / kBlock<Mt>;
  const auto block = wide_transforms(s) ? tile_block16<Mt> : tile_block8<Mt>;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> V(T::kPoints * (kBlock<Mt> * C + kStridePad)), M(T::kPoints * (kBlock<Mt> * K + kStridePad));
    std::vector<float> pad(T::kPoints * C);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t t0 = blk * kBlock<Mt>;
      block(x, U.data_ptr<float>(), bias, out, V.data(), M.data(), pad.data(), s, t0,
            std::min<int64_t>(kBlock<Mt>, tiles - t0));
    }
  });
}
#endif

// The weight and bias gradients by F(Mt x Mt, 3x3). Each thread sums its share of the blocks
// into its own double sums (the kPoints (K, C) point sums S, then the K bias sums), adding
// kFlushBlocks blocks summed in float32 at a time, so rounding does not grow with N.
template <int Mt>
std::tuple<at::Tensor, at::Tensor> weight_grad_by(const at::Tensor& grad, const at::Tensor& input) {
  constexpr int kPoints = Tiling<Mt>::kPoints;
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3), K = grad.size(1);
  const Shape s = tiled_shape<Mt>(N, H, W, C, K);
  const int64_t tiles = N * s.TH * s.TW, blocks = (tiles + kWgradBlock - 1) / kWgradBlock;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const int64_t per_thread = kPoints * K * C + K;
  at::Tensor partial = at::zeros({threads, per_thread}, input.options().dtype(at::kDouble)
                                                            .memory_format(at::MemoryFormat::Contiguous));
#if DVPVAE_HAVE_AVX2_KERNEL
  const float* x = input.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  double* sums = partial.data_ptr<double>();
  const auto block = wide_transforms(s) ? wgrad_block16<Mt> : wgrad_block8<Mt>;
  at::parallel_for(0, threads, 1, [&](int64_t th0, int64_t th1) {
    std::vector<float> V(kPoints * (kWgradBlock * C + kStridePad)), D(kPoints * (kWgradBlock * K + kStridePad));
    std::vector<float> pad(kPoints * C), S(per_thread);
    for (int64_t th = th0; th < th1; ++th) {
      const int64_t first = blocks * th / threads, last = blocks * (th + 1) / threads;
      for (int64_t b0 = first; b0 < last; b0 += kFlushBlocks) {
        std::fill(S.begin(), S.end(), 0.f);
        for (int64_t blk = b0; blk < std::min(last, b0 + kFlushBlocks); ++blk) {
          const int64_t t0 = blk * kWgradBlock;
          block(x, g, V.data(), D.data(), pad.data(), S.data(), S.data() + kPoints * K * C, s, t0,
                std::min<int64_t>(kWgradBlock, tiles - t0));
        }
        double* out = sums + th * per_thread;
        for (int64_t i = 0; i < per_thread; ++i) out[i] += S[i];
      }
    }
  });
#endif
  // The threads' sums in a fixed order, then dW[k, c] = G^T S[k, c] G in double: the transpose
  // of the filter transform, dW[t, k, c] = sum over the points e of T[e, t] S[e, k, c].
  const at::Tensor total = partial.sum(0);
  const at::Tensor point_sums = total.narrow(0, 0, kPoints * K * C).view({kPoints, K * C});
  const at::Tensor weight_grad = at::matmul(filter_transform_matrix<Mt>().t(), point_sums)
                                     .view({3, 3, K, C}).permute({2, 3, 0, 1}).contiguous().to(at::kFloat);
  return {weight_grad, total.narrow(0, kPoints * K * C, K).to(at::kFloat)};
}

}  // namespace

at::Tensor conv3x3_winograd_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, int64_t tile) {
  TORCH_CHECK(cpu_has_avx2_fma(), "dvpvae: the Winograd convolution needs an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(input.dim() == 4, "dvpvae: Winograd convolution: input must be 4-D (N, C, H, W), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == input.size(1) && weight.size(2) == 3 && weight.size(3) == 3,
              "dvpvae: Winograd convolution: weight must be (out, ", input.size(1), ", 3, 3), got ", weight.sizes());
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "dvpvae: Winograd convolution: input and weight must be float32, got ", input.scalar_type(), " and ",
              weight.scalar_type());
  CHECK_DEVICE(weight, input.device());
  TORCH_CHECK(input.is_contiguous(at::MemoryFormat::ChannelsLast),
              "dvpvae: Winograd convolution: input must be channels-last contiguous");
  const int64_t K = weight.size(0);
  TORCH_CHECK(input.size(1) % kLanes == 0 && K % kLanes == 0, "dvpvae: the Winograd convolution needs in and out "
              "channels % ", kLanes, " == 0, got ", input.size(1), " and ", K);
  TORCH_INTERNAL_ASSERT(tile == 2 || tile == 4);  // conv_cl_cpu.cpp checks the ops' tile argument
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K && bias->scalar_type() == at::kFloat,
                "dvpvae: Winograd convolution: bias must be float32 (", K, "), got ", bias->sizes(), " ",
                bias->scalar_type());
    CHECK_DEVICE(*bias, input.device());
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const int64_t N = input.size(0), H = input.size(2), W = input.size(3);
  at::Tensor out = at::empty({N, K, H, W}, input.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
#if DVPVAE_HAVE_AVX2_KERNEL
  (tile == 2 ? winograd_forward<2> : winograd_forward<4>)(input.data_ptr<float>(), weight, b, out.data_ptr<float>(),
                                                          N, H, W);
#endif
  return out;
}

std::tuple<at::Tensor, at::Tensor> winograd_weight_grad(const at::Tensor& grad, const at::Tensor& input,
                                                        int64_t tile) {
  TORCH_INTERNAL_ASSERT(tile == 2 || tile == 4);  // conv_weight_grad_cpu checks the tile argument
  return tile == 2 ? weight_grad_by<2>(grad, input) : weight_grad_by<4>(grad, input);
}

}  // namespace dvpvae
