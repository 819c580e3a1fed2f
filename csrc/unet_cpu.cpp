// The T-step DDPM loop of the diffusion prior with a native forward of dvpvae.unet.UNet
// (float32, CPU). The UNet is tiny (16-32 channels on 5x5 or 7x7 pseudoinputs), so library
// convolutions would spend most of their time in per-call set-up; here nothing is set up
// per layer call:
//   * every sample is independent through the whole loop (GroupNorm and attention are
//     per sample, t is shared), so each thread runs the full T steps for its share of the
//     batch with its own preallocated buffers and no synchronisation between layers;
//   * activations are NHWC with the channels innermost, so a 3x3 convolution is a
//     register-blocked loop over a row of output pixels x 16 output channels, reading a
//     zero-bordered copy of its input; on AVX2 CPUs the convolutions after the input one
//     run by Winograd F(2x2, 3x3) instead (winograd.h), on filters transformed once per call;
//   * GroupNorm is folded to a per-channel scale/shift (as ATen's CPU kernel does) and
//     fused with FiLM and SiLU into the write of the next convolution's input.
// The time embedding and FiLM depend only on the step: Python computes them with the
// UNet's own modules and passes the (T, blocks, 2, C) table. Weights are re-laid out once
// per call from the tensors passed in, so the op always samples with the current weights.
// Results match the Python loop up to float32 round-off (other summation orders than
// oneDNN/ATen).
#include "ops.h"
#include "winograd.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Vector code is written with GCC vector extensions and compiled three times (AVX-512,
// AVX2+FMA, baseline), picked at load time: the wheel must not require -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DVPVAE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DVPVAE_CLONES
#endif

namespace dvpvae {
namespace {

constexpr int kV = 16;  // channels per vector; UNet widths are multiples of 16 (GroupNorm(16, C))
// The Winograd convolutions' tile side (see conv3x3): F(2x2, 3x3) only adds and subtracts in
// its transforms; F(4x4, 3x3)'s larger rounding exceeds the sampler's float32 bounds.
constexpr int kTile = 2;
using vec = vec16;  // vec8 is half of one: without AVX-512 the convolution holds each
                    // 16-channel block as two of them, which map onto 8-float registers.
static_assert(kWidth<vec> == kV);

template <typename V = vec>
DVPVAE_INLINE V splat(float x) { return V{} + x; }

// e^x, Cephes' expf polynomial (~1 ulp): x = n ln2 + r with |r| <= ln2/2, 2^n from the
// exponent bits. libm's expf does not vectorize, and SiLU / softmax need one per value.
template <typename V>
DVPVAE_INLINE V vexp(V x) {
  typedef int32_t IV __attribute__((vector_size(sizeof(V))));
  x = x < -87.3f ? splat<V>(-87.3f) : x;  // keeps 2^n a normal number
  x = x > 88.3f ? splat<V>(88.3f) : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

template <typename V>
DVPVAE_INLINE V vsilu(V x) { return x / (1.0f + vexp(-x)); }

// NP consecutive output pixels of one row, all output channels: out[p] = res[p] + bias +
// sum over taps and input channels of in[p + tap][ci] * w[tap][ci][:]. `in` points at the
// window's top-left pixel; pixels are ldi floats apart, rows in_w pixels. No bias: 0.
// Each 16-channel block is accumulated in kV / lanes(V) vectors of type V.
template <typename V, int KS, int NP>
DVPVAE_INLINE void conv_pixels(const float* in, ptrdiff_t in_w, ptrdiff_t ldi, ptrdiff_t cin, const float* w,
                               const float* bias, ptrdiff_t cout, float* out, const float* res) {
  constexpr int kL = sizeof(V) / sizeof(float), kParts = kV / kL;
  // ptrdiff_t offsets and bumped pointers keep sign extensions out of the inner loop's
  // address arithmetic.
  for (ptrdiff_t cb = 0; cb < cout; cb += kV) {
    V acc[kParts][NP];
#pragma GCC unroll 2
    for (int h = 0; h < kParts; ++h) {
      const V b = bias ? load<V>(bias + cb + h * kL) : V{};
#pragma GCC unroll 8
      for (int p = 0; p < NP; ++p) acc[h][p] = b;
    }
    const float* wp = w + cb;
    for (int ky = 0; ky < KS; ++ky) {
      for (int kx = 0; kx < KS; ++kx) {
        const float* ip = in + (ky * in_w + kx) * ldi;
#pragma GCC unroll 4
        for (ptrdiff_t ci = 0; ci < cin; ++ci, wp += cout, ++ip) {
          V wv[kParts];
#pragma GCC unroll 2
          for (int h = 0; h < kParts; ++h) wv[h] = load<V>(wp + h * kL);
#pragma GCC unroll 8
          for (int p = 0; p < NP; ++p) {
            const float xv = ip[p * ldi];
#pragma GCC unroll 2
            for (int h = 0; h < kParts; ++h) acc[h][p] += xv * wv[h];
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; ++p)
#pragma GCC unroll 2
      for (int h = 0; h < kParts; ++h) {
        float* o = out + p * cout + cb + h * kL;
        store(o, res ? load<V>(res + p * cout + cb + h * kL) + acc[h][p] : acc[h][p]);
      }
  }
}

// conv_pixels for the n <= NP pixels left at the end of a row.
template <typename V, int KS, int NP>
DVPVAE_INLINE void conv_pixels_tail(int n, const float* in, ptrdiff_t in_w, ptrdiff_t ldi, ptrdiff_t cin,
                                    const float* w, const float* bias, ptrdiff_t cout, float* out, const float* res) {
  if (n == NP)
    conv_pixels<V, KS, NP>(in, in_w, ldi, cin, w, bias, cout, out, res);
  else if constexpr (NP > 1)
    conv_pixels_tail<V, KS, NP - 1>(n, in, in_w, ldi, cin, w, bias, cout, out, res);
}

// KSxKS convolution (KS = 3: `in` is zero-bordered, its H x W image at (1, 1) of rows of
// in_w >= W + 2 pixels; KS = 1: plain H x W, in_w = W) of cin channels to cout (a multiple of
// 16) channels, out = [res +] conv(in). Input pixels are ldi floats apart (cin for a plain
// NHWC tensor). With KS = 1 and H = 1 it is the matrix product out (W x cout) = in (W x cin)
// w (cin x cout). MaxNP pixels x 16 channels of accumulators are kept in registers.
template <typename V, int KS, int MaxNP>
DVPVAE_INLINE void conv_rows(const float* in, int in_w, int ldi, int cin, const float* w, const float* bias,
                             int cout, int H, int W, float* out, const float* res) {
  for (int y = 0; y < H; ++y) {
    for (int x = 0; x < W; x += MaxNP) {
      const float* ip = in + (y * in_w + x) * ldi;
      float* op = out + (y * W + x) * cout;
      const float* rp = res ? res + (y * W + x) * cout : nullptr;
      conv_pixels_tail<V, KS, MaxNP>(std::min(MaxNP, W - x), ip, in_w, ldi, cin, w, bias, cout, op, rp);
    }
  }
}

// Whether the vector code runs 16-float vectors (AVX-512) or 8-float halves (AVX2 and
// baseline): GCC splits wider-than-register vectors into poor code. Checked once.
DVPVAE_INLINE bool wide_vectors() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_has_avx512f();
#else
  return true;
#endif
}

// The accumulator tile must fit the vector registers: with AVX-512 (32 registers of 16
// floats) 8 pixels x 16 channels, otherwise 6 pixels x two vec8 halves (12 of AVX2's 16
// registers of 8 floats). Every clone carries both.
template <int KS>
DVPVAE_INLINE void conv_impl(const float* in, int in_w, int ldi, int cin, const float* w, const float* bias,
                             int cout, int H, int W, float* out, const float* res) {
  if (wide_vectors())
    conv_rows<vec, KS, 8>(in, in_w, ldi, cin, w, bias, cout, H, W, out, res);
  else
    conv_rows<vec8, KS, 6>(in, in_w, ldi, cin, w, bias, cout, H, W, out, res);
}

DVPVAE_CLONES void conv3x3_direct(const float* in, int in_w, int cin, const float* w, const float* bias, int cout,
                                  int H, int W, float* out, const float* res) {
  conv_impl<3>(in, in_w, cin, cin, w, bias, cout, H, W, out, res);
}

DVPVAE_CLONES void conv1x1(const float* in, int cin, const float* w, const float* bias, int cout,
                           int H, int W, float* out, const float* res) {
  conv_impl<1>(in, W, cin, cin, w, bias, cout, H, W, out, res);
}

// The tile side of the UNet's Winograd convolutions (see conv3x3) on AVX2 CPUs without
// AVX-512; 0 where they run direct: AVX-512 CPUs, which keep the 16-wide direct kernel, and
// CPUs without AVX2. A rule on the ISA alone, so that every process computes the same numbers.
int winograd_tile() { return cpu_has_avx2_fma() && !wide_vectors() ? kTile : 0; }

// Where a sample sits in the zero-bordered buffers that 3x3 convolutions read: its H x W
// image at (1, 1) of Hp x Wp pixels. With Winograd tiles of side `tile` (TH x TW of them)
// the border also covers the last tiles' patches, so that every patch is read in place.
struct Layout {
  int H, W, TH, TW, Hp, Wp;
  Layout(int tile, int H, int W)
      : H(H), W(W), TH(tile ? tile_count(H, tile) : 0), TW(tile ? tile_count(W, tile) : 0),
        Hp(tile ? TH * tile + 2 : H + 2), Wp(tile ? TW * tile + 2 : W + 2) {}
  int64_t pixels() const { return static_cast<int64_t>(H) * W; }
  int64_t padded() const { return static_cast<int64_t>(Hp) * Wp; }
};

#if DVPVAE_HAVE_AVX2_KERNEL
// out = [res +] bias + conv(in) by F(kTile x kTile, 3x3): `in` holds cin channels
// zero-bordered as `l` lays them out, U the transformed filters (kPoints, cin, cout); cin and
// cout are multiples of 8. V (kPoints x (tiles x cin + kStridePad) floats) and M (kPoints x
// (tiles x cout + kStridePad)) are scratch.
DVPVAE_AVX2 void conv3x3_winograd(const float* __restrict in, int cin, const float* __restrict U,
                                  const float* __restrict bias, int cout, const Layout& l, float* __restrict out,
                                  const float* __restrict res, float* __restrict V, float* __restrict M) {
  constexpr int Mt = kTile;
  const int64_t tiles = static_cast<int64_t>(l.TH) * l.TW, ldv = tiles * cin + kStridePad,
                ldm = tiles * cout + kStridePad, row = static_cast<int64_t>(l.Wp) * cin;
  for (int ty = 0, r = 0; ty < l.TH; ++ty)
    for (int tx = 0; tx < l.TW; ++tx, ++r) {
      const Patch d{in + Mt * (ty * row + tx * cin), row};
      for (int c = 0; c < cin; c += kLanes) input_tile<Mt, vec8>(d, V, r, c, cin, ldv);
    }
  for (int e = 0; e < Tiling<Mt>::kPoints; ++e)  // M = V @ U
    row_products<false>(V + e * ldv, cin, 1, U + static_cast<int64_t>(e) * cin * cout, cout, M + e * ldm, cout, cin,
                        cout, tiles);
  for (int ty = 0, r = 0; ty < l.TH; ++ty)
    for (int tx = 0; tx < l.TW; ++tx, ++r) {
      const int64_t o = (static_cast<int64_t>(Mt) * ty * l.W + Mt * tx) * cout;
      for (int k = 0; k < cout; k += kLanes)
        store_output_tile<Mt, vec8>(M + r * cout + k, ldm, bias ? bias + k : nullptr, res ? res + o + k : nullptr,
                                    out + o + k, static_cast<int64_t>(l.W) * cout, cout, l.H - Mt * ty, l.W - Mt * tx);
    }
}
#endif

// GroupNorm of x (HW pixels x ch channels, `groups` groups of consecutive channels),
// then optionally FiLM (x * scale1p + shift) and SiLU. Writes pixel (y, x) to
// out + (y out_w + x) ch: into the interior of a zero-bordered buffer, or a plain H x W one
// with out_w = W. `scratch` holds 3 * ch floats.
template <typename V>
DVPVAE_INLINE void group_norm_act_impl(const float* x, int H, int W, int ch, int groups, const float* gamma,
                                       const float* beta, float eps, const float* scale1p, const float* shift,
                                       bool silu, int out_w, float* out, float* scratch) {
  constexpr int kL = sizeof(V) / sizeof(float);
  const int HW = H * W, cpg = ch / groups;
  float* sum = scratch;
  float* a = scratch + ch;
  float* b = scratch + 2 * ch;
  // Two passes (mean, then centred squares): per-channel sums over the pixels in float
  // vectors, combined per group in double.
  for (int c = 0; c < ch; c += kL) store(sum + c, V{});
  for (int p = 0; p < HW; ++p)
    for (int c = 0; c < ch; c += kL) store(sum + c, load<V>(sum + c) + load<V>(x + p * ch + c));
  const double count = static_cast<double>(cpg) * HW;
  for (int g = 0; g < groups; ++g) {
    double s = 0;
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) s += sum[c];
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) b[c] = static_cast<float>(s / count);  // mean
  }
  for (int c = 0; c < ch; c += kL) store(sum + c, V{});
  for (int p = 0; p < HW; ++p)
    for (int c = 0; c < ch; c += kL) {
      const V d = load<V>(x + p * ch + c) - load<V>(b + c);
      store(sum + c, load<V>(sum + c) + d * d);
    }
  for (int g = 0; g < groups; ++g) {
    double s = 0;
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) s += sum[c];
    const float rstd = static_cast<float>(1.0 / std::sqrt(s / count + eps));
    // ATen's CPU GroupNorm applies the same folded form: x * (rstd gamma) + (beta - mean rstd gamma).
    for (int c = g * cpg; c < (g + 1) * cpg; ++c) {
      a[c] = rstd * gamma[c];
      b[c] = beta[c] - b[c] * a[c];
    }
  }
  for (int y = 0; y < H; ++y)
    for (int xx = 0; xx < W; ++xx) {
      const float* xp = x + (y * W + xx) * ch;
      float* op = out + (y * out_w + xx) * ch;
      for (int c = 0; c < ch; c += kL) {
        V v = load<V>(xp + c) * load<V>(a + c) + load<V>(b + c);
        if (scale1p) v = v * load<V>(scale1p + c) + load<V>(shift + c);
        store(op + c, silu ? vsilu(v) : v);
      }
    }
}

DVPVAE_CLONES void group_norm_act(const float* x, int H, int W, int ch, int groups, const float* gamma,
                                  const float* beta, float eps, const float* scale1p, const float* shift,
                                  bool silu, int out_w, float* out, float* scratch) {
  if (wide_vectors())
    group_norm_act_impl<vec>(x, H, W, ch, groups, gamma, beta, eps, scale1p, shift, silu, out_w, out, scratch);
  else
    group_norm_act_impl<vec8>(x, H, W, ch, groups, gamma, beta, eps, scale1p, shift, silu, out_w, out, scratch);
}

// Row si (HWp floats) of the scores <- softmax(si / scale) over its first HW entries.
template <typename V>
DVPVAE_INLINE void softmax_row(float* si, int HW, int HWp, float scale) {
  constexpr int kL = sizeof(V) / sizeof(float);
  float m = -INFINITY;
  for (int j = 0; j < HWp; j += kL) store(si + j, load<V>(si + j) / scale);
  for (int j = 0; j < HW; ++j) m = std::max(m, si[j]);
  float total = 0.0f;
  for (int j = 0; j < HWp; j += kL) store(si + j, vexp(load<V>(si + j) - m));
  for (int j = 0; j < HW; ++j) total += si[j];
  for (int j = 0; j < HWp; j += kL) store(si + j, load<V>(si + j) / total);
}

// Single-head attention core: o[i] = sum_j softmax_j(q[i].k[j] / sqrt(C)) v[j], with q, k, v
// the three C-channel slices of qkv (HW x 3C), as two matrix products on the convolution
// kernel. Scratch: kT (C x HWp), v (HW x C), s (HW x HWp), HWp = HW rounded up to 16.
DVPVAE_CLONES void attention(const float* qkv, int HW, int C, float* o, float* kT, float* v, float* s) {
  const int HWp = (HW + kV - 1) / kV * kV;
  for (int c = 0; c < C; ++c) {
    for (int j = 0; j < HW; ++j) kT[c * HWp + j] = qkv[j * 3 * C + C + c];
    for (int j = HW; j < HWp; ++j) kT[c * HWp + j] = 0.0f;
  }
  for (int j = 0; j < HW; ++j) std::memcpy(v + j * C, qkv + j * 3 * C + 2 * C, C * sizeof(float));
  conv_impl<1>(qkv, HW, 3 * C, C, kT, nullptr, HWp, 1, HW, s, nullptr);
  const float scale = static_cast<float>(std::sqrt(static_cast<double>(C)));
  for (int i = 0; i < HW; ++i) {
    if (wide_vectors())
      softmax_row<vec>(s + i * HWp, HW, HWp, scale);
    else
      softmax_row<vec8>(s + i * HWp, HW, HWp, scale);
  }
  // The padded columns j >= HW of s multiply nothing: the product stops at HW.
  conv_impl<1>(s, HW, HWp, HW, v, nullptr, C, 1, HW, o, nullptr);
}

// ---------------------------------------------------------------------------- weights
// Columns of the (T, 5) step table of kernels/ddpm_step.py (COL_*); row i is the step
// t = (i+1)/T -> s = i/T.
enum Col : int64_t { kSigmaT = 0, kInvAlphaT = 1, kCZ = 2, kCX = 3, kCNoise = 4, kNumCols = 5 };

// One ancestral update of one element, as kernels/ddpm_step.py's ddpm_step_ref computes it
// in float32 (c_n = temperature * c_noise):
// z_s = c_z z + c_x clamp((z - sigma_t eps_hat) / alpha_t, -1, 1) + c_n noise.
inline float ddpm_update(float z, float eps_hat, float noise, float sigma_t, float inv_alpha_t, float c_z,
                         float c_x, float c_n) {
  float x_hat = (z - sigma_t * eps_hat) * inv_alpha_t;
  x_hat = std::min(std::max(x_hat, -1.0f), 1.0f);
  return c_z * z + c_x * x_hat + c_n * noise;
}

struct BlockW {
  const float *gn1_w, *gn1_b, *conv1_w, *conv1_b, *gn2_w, *gn2_b, *conv2_w, *conv2_b;
  const float* skip_w = nullptr;  // 1x1, only when the block's input has 2C channels
  const float* skip_b = nullptr;
  int cin;
};

// The UNet's weights for the kernels above: the 3x3 convolutions after the input one as
// Winograd points [e][cin][cout] when tile != 0, the others re-laid out as [tap][cin][cout]
// (cout innermost; the output conv's cout padded with zeros to cout_pad), vectors read in place.
struct UNetW {
  int in_ch = 0, C = 0, nrb = 0, groups = 0, cout_pad = 0, tile = 0;
  float eps = 0;
  std::vector<std::vector<float>> store;  // the re-laid-out copies (moving keeps their data)
  const float *in_w, *in_b, *attn_gn_w, *attn_gn_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
  const float *out_gn_w, *out_gn_b, *out_w, *out_b;
  std::vector<BlockW> blocks;  // down..., mid1, mid2, up...

  // Floats of one row of the films table: [1 + scale, shift] of every time block.
  int64_t film_floats() const { return static_cast<int64_t>(blocks.size()) * 2 * C; }
};

// Reads `weights` in the order dvpvae/native_prior.py lays them out, checking each shape.
class WeightReader {
 public:
  WeightReader(at::TensorList w, UNetW& u, const char* op) : w_(w), u_(u), op_(op) {}

  // A (n,) vector, read in place.
  const float* vector(int64_t n) { return next({n}).data_ptr<float>(); }

  // A (n,) vector copied and zero-padded to `padded` values.
  const float* padded_vector(int64_t n, int64_t padded) {
    const float* src = vector(n);
    std::vector<float>& dst = u_.store.emplace_back(padded, 0.0f);
    std::memcpy(dst.data(), src, n * sizeof(float));
    return dst.data();
  }

  // A convolution weight of shape (cout, cin, k[, k]) -> [tap][cin][cout_pad].
  const float* conv(c10::IntArrayRef shape, int64_t cout_pad) {
    const at::Tensor& t = next(shape);
    const int64_t cout = shape[0], cin = shape[1], taps = t.numel() / (cout * cin);
    const float* src = t.data_ptr<float>();
    std::vector<float>& dst = u_.store.emplace_back(taps * cin * cout_pad, 0.0f);
    for (int64_t o = 0; o < cout; ++o)
      for (int64_t i = 0; i < cin; ++i)
        for (int64_t k = 0; k < taps; ++k) dst[(k * cin + i) * cout_pad + o] = src[(o * cin + i) * taps + k];
    return dst.data();
  }

  // A 3x3 convolution weight (cout, cin, 3, 3) for conv3x3: as `conv` lays it out, or
  // transformed for F(tile x tile, 3x3) with cout zero-padded to cout_pad.
  const float* conv3x3(c10::IntArrayRef shape, int64_t cout_pad) {
    if (u_.tile == 0) return conv(shape, cout_pad);
    const at::Tensor& t = next(shape);
    at::Tensor w = at::zeros({cout_pad, shape[1], 3, 3}, t.options());
    w.narrow(0, 0, shape[0]).copy_(t);
    const at::Tensor U = transform_filters<kTile>(w);
    const float* src = U.const_data_ptr<float>();
    return u_.store.emplace_back(src, src + U.numel()).data();
  }

  void finish() const {
    TORCH_CHECK(pos_ == w_.size(), op_, ": got ", w_.size(),
                " weight tensors, the UNet with num_res_blocks = ", u_.nrb, " has ", pos_);
  }

 private:
  const at::Tensor& next(c10::IntArrayRef shape) {
    TORCH_CHECK(pos_ < w_.size(), op_, ": got ", w_.size(),
                " weight tensors, too few for num_res_blocks = ", u_.nrb);
    const at::Tensor& t = w_[pos_];
    TORCH_CHECK(t.sizes() == shape, op_, ": weights[", pos_, "] must have shape ", shape,
                ", got ", t.sizes());
    ++pos_;
    return t;
  }

  at::TensorList w_;
  UNetW& u_;
  const char* op_;
  size_t pos_ = 0;
};

// A time block: norm_in, conv_in, norm_out, conv_out (weight, bias each), then the 1x1
// skip when cin != C.
BlockW read_block(WeightReader& r, int64_t cin, int64_t C) {
  BlockW b{};
  b.cin = static_cast<int>(cin);
  b.gn1_w = r.vector(cin);
  b.gn1_b = r.vector(cin);
  b.conv1_w = r.conv3x3({C, cin, 3, 3}, C);
  b.conv1_b = r.vector(C);
  b.gn2_w = r.vector(C);
  b.gn2_b = r.vector(C);
  b.conv2_w = r.conv3x3({C, C, 3, 3}, C);
  b.conv2_b = r.vector(C);
  if (cin != C) {
    b.skip_w = r.conv({C, cin, 1, 1}, C);
    b.skip_b = r.vector(C);
  }
  return b;
}

// ---------------------------------------------------------------------------- forward
// Per-thread buffers, allocated once per call and reused for every sample and step. The
// zero-bordered buffers keep their borders: only interiors are ever written.
struct Workspace {
  std::vector<float> mem;
  float *zpad, *padC, *pad2C, *cat, *t1, *t2, *m1, *m2, *h, *qkv, *o, *kT, *v, *s, *eps_pad, *scratch, *V, *M;
  std::vector<float*> stack;

  Workspace(const UNetW& u, const Layout& l) {
    const size_t HW = l.pixels(), P = l.padded(), C = u.C, HWp = (HW + kV - 1) / kV * kV;
    const size_t tiles = static_cast<size_t>(l.TH) * l.TW, points = u.tile ? Tiling<kTile>::kPoints : 0;
    const size_t sizes[] = {P * u.in_ch, P * C, P * 2 * C, HW * 2 * C, HW * C, HW * C, HW * C, HW * C, HW * C,
                            HW * 3 * C, HW * C, C * HWp, HW * C, HW * HWp, HW * u.cout_pad, 6 * C,
                            points * (tiles * 2 * C + kStridePad), points * (tiles * C + kStridePad)};
    float** ptrs[] = {&zpad, &padC, &pad2C, &cat, &t1, &t2, &m1, &m2, &h, &qkv, &o, &kT, &v, &s, &eps_pad, &scratch,
                      &V, &M};
    size_t total = 0;
    for (size_t s : sizes) total += s;
    total += (u.nrb + 1) * HW * C;
    mem.assign(total, 0.0f);
    float* p = mem.data();
    for (size_t j = 0; j < sizeof(sizes) / sizeof(sizes[0]); ++j) {
      *ptrs[j] = p;
      p += sizes[j];
    }
    for (int j = 0; j <= u.nrb; ++j, p += HW * C) stack.push_back(p);
  }
};

// out = [res +] bias + conv3x3(in) for cin channels zero-bordered as `l` lays them out, with
// the weights as read_unet lays them out for conv3x3.
void conv3x3(const UNetW& u, Workspace& ws, const Layout& l, const float* in, int cin, const float* w,
             const float* bias, int cout, float* out, const float* res) {
#if DVPVAE_HAVE_AVX2_KERNEL
  if (u.tile) return conv3x3_winograd(in, cin, w, bias, cout, l, out, res, ws.V, ws.M);
#endif
  conv3x3_direct(in, l.Wp, cin, w, bias, cout, l.H, l.W, out, res);
}

// group_norm_act with SiLU of x (H x W x ch) into the interior of the zero-bordered `pad`.
void norm_act_padded(const UNetW& u, Workspace& ws, const Layout& l, const float* x, int ch, const float* gamma,
                     const float* beta, const float* scale1p, const float* shift, float* pad) {
  group_norm_act(x, l.H, l.W, ch, u.groups, gamma, beta, u.eps, scale1p, shift, true, l.Wp, pad + (l.Wp + 1) * ch,
                 ws.scratch);
}

void res_block(const UNetW& u, const BlockW& b, Workspace& ws, const Layout& l, const float* film, const float* x,
               float* out) {
  const int C = u.C;
  float* pad_in = b.cin == C ? ws.padC : ws.pad2C;
  norm_act_padded(u, ws, l, x, b.cin, b.gn1_w, b.gn1_b, nullptr, nullptr, pad_in);
  conv3x3(u, ws, l, pad_in, b.cin, b.conv1_w, b.conv1_b, C, ws.t1, nullptr);
  norm_act_padded(u, ws, l, ws.t1, C, b.gn2_w, b.gn2_b, film, film + C, ws.padC);
  const float* res = x;
  if (b.skip_w) {
    conv1x1(x, b.cin, b.skip_w, b.skip_b, C, l.H, l.W, ws.t2, nullptr);
    res = ws.t2;
  }
  conv3x3(u, ws, l, ws.padC, C, b.conv2_w, b.conv2_b, C, out, res);
}

// eps_hat (in_ch x H x W, NCHW like z) of one sample z at step k.
void unet_forward(const UNetW& u, Workspace& ws, const Layout& l, const float* films, const float* z,
                  float* eps_hat) {
  const int C = u.C, H = l.H, W = l.W, HW = H * W, nb = static_cast<int>(u.blocks.size());
  for (int c = 0; c < u.in_ch; ++c)
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) ws.zpad[((y + 1) * l.Wp + x + 1) * u.in_ch + c] = z[(c * H + y) * W + x];
  // in_ch need not be a multiple of 8: the input convolution is always direct.
  conv3x3_direct(ws.zpad, l.Wp, u.in_ch, u.in_w, u.in_b, C, H, W, ws.stack[0], nullptr);
  int bi = 0;
  auto block = [&](const float* x, float* out) {
    res_block(u, u.blocks[bi], ws, l, films + bi * 2 * C, x, out);
    ++bi;
  };
  for (int j = 0; j < u.nrb; ++j) block(ws.stack[j], ws.stack[j + 1]);
  block(ws.stack[u.nrb], ws.m1);
  // SelfAttention: m2 = m1 + proj(attn(qkv(norm(m1))))
  group_norm_act(ws.m1, H, W, C, u.groups, u.attn_gn_w, u.attn_gn_b, u.eps, nullptr, nullptr, false, W, ws.t1,
                 ws.scratch);
  conv1x1(ws.t1, C, u.qkv_w, u.qkv_b, 3 * C, H, W, ws.qkv, nullptr);
  attention(ws.qkv, HW, C, ws.o, ws.kT, ws.v, ws.s);
  conv1x1(ws.o, C, u.proj_w, u.proj_b, C, H, W, ws.m2, ws.m1);
  block(ws.m2, ws.h);
  for (int j = u.nrb; j >= 0; --j) {
    // torch.cat([h, skip], dim=1): channels [0, C) from h, [C, 2C) from the stack.
    for (int p = 0; p < HW; ++p) {
      std::memcpy(ws.cat + p * 2 * C, ws.h + p * C, C * sizeof(float));
      std::memcpy(ws.cat + p * 2 * C + C, ws.stack[j] + p * C, C * sizeof(float));
    }
    block(ws.cat, ws.h);
  }
  TORCH_INTERNAL_ASSERT(bi == nb);
  norm_act_padded(u, ws, l, ws.h, C, u.out_gn_w, u.out_gn_b, nullptr, nullptr, ws.padC);
  conv3x3(u, ws, l, ws.padC, C, u.out_w, u.out_b, u.cout_pad, ws.eps_pad, nullptr);
  for (int c = 0; c < u.in_ch; ++c)
    for (int p = 0; p < HW; ++p) eps_hat[c * HW + p] = ws.eps_pad[p * u.cout_pad + c];
}

// Checks what the op's arguments say about the UNet before its weights are read: the
// weight tensors' type and layout, and the channels C (returned) against kV and `groups`.
int64_t unet_channels(at::TensorList weights, int64_t num_res_blocks, int64_t groups, const char* op) {
  TORCH_CHECK(num_res_blocks >= 0, op, ": num_res_blocks must be >= 0, got ", num_res_blocks);
  for (size_t j = 0; j < weights.size(); ++j) {
    TORCH_CHECK(weights[j].device().is_cpu() && weights[j].scalar_type() == at::kFloat &&
                    weights[j].is_contiguous(),
                op, ": weights[", j, "] must be a contiguous float32 CPU tensor, got ",
                weights[j].scalar_type(), " on ", weights[j].device(),
                weights[j].is_contiguous() ? "" : " (not contiguous)");
  }
  TORCH_CHECK(!weights.empty() && weights[0].dim() >= 1,
              op, ": weights[0] must be the input convolution's weight (C, in_ch, 3, 3)");
  const int64_t C = weights[0].size(0);
  TORCH_CHECK(C >= kV && C % kV == 0, op, ": channels must be a multiple of ", kV, ", got ", C);
  TORCH_CHECK(groups >= 1 && C % groups == 0, op, ": channels ", C, " not divisible into ", groups, " groups");
  return C;
}

// The UNet of `weights` (dvpvae/native_prior.py's layout, checked by unet_channels) for
// inputs of in_ch channels; `op` names the caller in the errors.
UNetW read_unet(at::TensorList weights, int64_t in_ch, int64_t num_res_blocks, int64_t groups, double eps,
                const char* op) {
  const int64_t C = weights[0].size(0);
  UNetW u;
  u.in_ch = static_cast<int>(in_ch);
  u.C = static_cast<int>(C);
  u.nrb = static_cast<int>(num_res_blocks);
  u.groups = static_cast<int>(groups);
  u.eps = static_cast<float>(eps);
  u.tile = winograd_tile();
  const int64_t cout_align = u.tile ? kLanes : kV;
  u.cout_pad = static_cast<int>((in_ch + cout_align - 1) / cout_align * cout_align);
  WeightReader r(weights, u, op);
  u.in_w = r.conv({C, in_ch, 3, 3}, C);
  u.in_b = r.vector(C);
  for (int64_t j = 0; j < num_res_blocks; ++j) u.blocks.push_back(read_block(r, C, C));
  u.blocks.push_back(read_block(r, C, C));  // mid1
  u.attn_gn_w = r.vector(C);
  u.attn_gn_b = r.vector(C);
  u.qkv_w = r.conv({3 * C, C, 1}, 3 * C);
  u.qkv_b = r.vector(3 * C);
  u.proj_w = r.conv({C, C, 1}, C);
  u.proj_b = r.vector(C);
  u.blocks.push_back(read_block(r, C, C));  // mid2
  for (int64_t j = 0; j <= num_res_blocks; ++j) u.blocks.push_back(read_block(r, 2 * C, C));
  u.out_gn_w = r.vector(C);
  u.out_gn_b = r.vector(C);
  u.out_w = r.conv3x3({in_ch, C, 3, 3}, u.cout_pad);
  u.out_b = r.padded_vector(in_ch, u.cout_pad);
  r.finish();
  return u;
}

// The UNet of an op's arguments, checked, and its `films` checked: a contiguous float32
// (rows, 2 num_res_blocks + 3, 2, C) table on `device` (`rows_name` names rows in the error).
UNetW checked_unet(at::TensorList weights, const at::Tensor& films, int64_t rows, const char* rows_name,
                   c10::Device device, int64_t in_ch, int64_t num_res_blocks, int64_t groups, double eps,
                   const char* op) {
  const int64_t C = unet_channels(weights, num_res_blocks, groups, op);
  TORCH_CHECK(films.scalar_type() == at::kFloat, op, ": films must be float32, got ", films.scalar_type());
  CHECK_DEVICE(films, device);
  CHECK_CONTIGUOUS(films);
  const std::vector<int64_t> shape{rows, 2 * num_res_blocks + 3, 2, C};
  TORCH_CHECK(films.sizes() == c10::IntArrayRef(shape), op, ": films must have shape ", c10::IntArrayRef(shape),
              " = (", rows_name, ", 2 num_res_blocks + 3, 2, C), got ", films.sizes());
  return read_unet(weights, in_ch, num_res_blocks, groups, eps, op);
}

}  // namespace

at::Tensor ddpm_sample_unet_cpu(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                const at::Tensor& films, at::TensorList weights, int64_t num_res_blocks,
                                int64_t groups, double eps, double temperature) {
  const char* op = "dvpvae.ddpm_sample_unet";
  TORCH_CHECK(z_T.device().is_cpu(), op, ": z_T is on ", z_T.device());
  TORCH_CHECK(z_T.dim() == 4 && z_T.size(0) >= 1 && z_T.size(2) >= 1 && z_T.size(3) >= 1,
              op, ": z_T must be (N, C, H, W) with N >= 1, got shape ", z_T.sizes());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == kNumCols && coef.size(0) >= 1,
              op, ": coef must be a (T, 5) table with T >= 1, got shape ", coef.sizes());
  const int64_t T = coef.size(0), N = z_T.size(0), in_ch = z_T.size(1);
  std::vector<int64_t> noise_shape{T};
  noise_shape.insert(noise_shape.end(), z_T.sizes().begin(), z_T.sizes().end());
  TORCH_CHECK(noise.sizes() == c10::IntArrayRef(noise_shape), op, ": noise must have shape ",
              c10::IntArrayRef(noise_shape), " = (T,) + z_T.shape, got ", noise.sizes());
  for (const at::Tensor* t : {&z_T, &noise, &coef})
    TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": z_T, noise and coef must be float32, got ",
                z_T.scalar_type(), ", ", noise.scalar_type(), ", ", coef.scalar_type());
  CHECK_DEVICE(noise, z_T.device());
  CHECK_DEVICE(coef, z_T.device());
  CHECK_CONTIGUOUS(z_T);
  CHECK_CONTIGUOUS(noise);
  CHECK_CONTIGUOUS(coef);
  const UNetW u = checked_unet(weights, films, T, "T", z_T.device(), in_ch, num_res_blocks, groups, eps, op);

  const int H = static_cast<int>(z_T.size(2)), W = static_cast<int>(z_T.size(3));
  const int64_t D = in_ch * H * W;
  at::Tensor out = at::empty_like(z_T);
  const float* zT = z_T.const_data_ptr<float>();
  const float* nz = noise.const_data_ptr<float>();
  const float* rows = coef.const_data_ptr<float>();
  const float* film = films.const_data_ptr<float>();
  float* zo = out.mutable_data_ptr<float>();
  const float temp = static_cast<float>(temperature);
  const Layout l(u.tile, H, W);
  // Grain 1: one sample's T steps far outweigh a thread's start-up.
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(u, l);
    std::vector<float> eps_hat(D);
    for (int64_t s = begin; s < end; ++s) {
      float* z = zo + s * D;
      std::memcpy(z, zT + s * D, D * sizeof(float));
      for (int64_t k = 0; k < T; ++k) {
        const int64_t i = T - 1 - k;  // row i: t = (i+1)/T -> s = i/T; noise and films row k
        unet_forward(u, ws, l, film + k * u.film_floats(), z, eps_hat.data());
        const float* row = rows + i * kNumCols;
        // The reference forms temperature * c_noise in float32 before the multiply.
        const float c_n = temp * row[kCNoise];
        const float* nk = nz + (k * N + s) * D;
        for (int64_t e = 0; e < D; ++e)
          z[e] = ddpm_update(z[e], eps_hat[e], nk[e], row[kSigmaT], row[kInvAlphaT], row[kCZ], row[kCX], c_n);
      }
    }
  });
  return out;
}

at::Tensor unet_eps_cpu(const at::Tensor& z, const at::Tensor& films, at::TensorList weights,
                        int64_t num_res_blocks, int64_t groups, double eps) {
  const char* op = "dvpvae.unet_eps";
  TORCH_CHECK(z.device().is_cpu(), op, ": z is on ", z.device());
  TORCH_CHECK(z.dim() == 4 && z.size(2) >= 1 && z.size(3) >= 1, op, ": z must be (N, C, H, W), got shape ",
              z.sizes());
  TORCH_CHECK(z.scalar_type() == at::kFloat, op, ": z must be float32, got ", z.scalar_type());
  CHECK_CONTIGUOUS(z);
  const int64_t N = z.size(0), in_ch = z.size(1);
  const UNetW u = checked_unet(weights, films, N, "N", z.device(), in_ch, num_res_blocks, groups, eps, op);
  const int H = static_cast<int>(z.size(2)), W = static_cast<int>(z.size(3));
  const int64_t D = in_ch * H * W;
  at::Tensor out = at::empty_like(z);
  const float* zi = z.const_data_ptr<float>();
  const float* film = films.const_data_ptr<float>();
  float* eo = out.mutable_data_ptr<float>();
  const Layout l(u.tile, H, W);
  // Grain 16: a few samples' forwards outweigh a thread's start-up and its workspace.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    Workspace ws(u, l);
    for (int64_t s = begin; s < end; ++s) unet_forward(u, ws, l, film + s * u.film_floats(), zi + s * D, eo + s * D);
  });
  return out;
}

at::Tensor ddpm_sample_unet_meta(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                 const at::Tensor& films, at::TensorList weights, int64_t num_res_blocks,
                                 int64_t groups, double eps, double temperature) {
  // Shape/device rules only: meta tensors have no data.
  CHECK_DEVICE(noise, z_T.device());
  CHECK_DEVICE(coef, z_T.device());
  CHECK_DEVICE(films, z_T.device());
  TORCH_CHECK(coef.dim() == 2 && coef.sym_size(1) == kNumCols, "dvpvae.ddpm_sample_unet: coef must be a (T, 5) table");
  return at::empty_like(z_T);
}

at::Tensor unet_eps_meta(const at::Tensor& z, const at::Tensor& films, at::TensorList weights,
                         int64_t num_res_blocks, int64_t groups, double eps) {
  CHECK_DEVICE(films, z.device());
  return at::empty_like(z);
}

}  // namespace dvpvae
