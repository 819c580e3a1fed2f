// Weight and bias gradients of a stride-1 convolution with a 1x1 or 3x3 (zero-padding 1)
// kernel on channels-last float32 tensors (the ResNet blocks' convolutions), for the CPU
// training step.
//
//   dW[o, i, ky, kx] = sum_{n, y, x} grad[n, y, x, o] * input[n, y + ky - p, x + kx - p, i]
//   db[o]            = sum_{n, y, x} grad[n, y, x, o]
//
// A 3x3 kernel's gradients come from Winograd F(m x m, 3x3) (conv_winograd_cpu.cpp). For a 1x1
// kernel the sum is a (Co x pixels) @ (pixels x Ci) product: one sweep over a chunk of rows
// small enough for L1 accumulates a register tile of 4 output x 16 input channels. Work
// items are (image, row chunk) pairs; each thread sums into its own buffer and the buffers
// are added at the end, so the result does not depend on scheduling (only on the thread
// count).
#include "simd.h"
#include "ops.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace dvpvae {
namespace {

constexpr int kOutBlock = 4;  // output channels per register tile
constexpr int kLanes = 8;     // input channels per AVX2 vector

#if DVPVAE_HAVE_AVX2_KERNEL
// a_o += grad[o] * xv for the kOutBlock output channels at gp.
DVPVAE_AVX2_INLINE void fma_out_block(const float* __restrict gp, __m256 xv, __m256& a0, __m256& a1, __m256& a2,
                                      __m256& a3) {
  a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp), xv, a0);
  a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 1), xv, a1);
  a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 2), xv, a2);
  a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(gp + 3), xv, a3);
}

DVPVAE_AVX2_INLINE void add_to(float* __restrict d, __m256 a) {
  _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), a));
}

// out[o0 : o0 + 4, i0 : i0 + 8V] += products of grad rows [y0, y1) with the same input rows (1x1).
template <int V>
DVPVAE_AVX2 void kernel_tile1(const float* __restrict g, const float* __restrict x, float* __restrict out,
                              int64_t y0, int64_t y1, int64_t W, int64_t Co, int64_t Ci, int64_t o0, int64_t i0) {
  static_assert(V == 1 || V == 2, "one or two vectors of input channels per tile");
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  const float* gp = g + y0 * W * Co + o0;
  const float* xp = x + y0 * W * Ci + i0;
  for (int64_t p = 0; p < (y1 - y0) * W; ++p, gp += Co, xp += Ci) {
    fma_out_block(gp, _mm256_loadu_ps(xp), a0, a1, a2, a3);
    if (V == 2) fma_out_block(gp, _mm256_loadu_ps(xp + kLanes), b0, b1, b2, b3);
  }
  float* d = out + o0 * Ci + i0;
  add_to(d, a0), add_to(d + Ci, a1), add_to(d + 2 * Ci, a2), add_to(d + 3 * Ci, a3);
  if (V == 2) {
    d += kLanes;
    add_to(d, b0), add_to(d + Ci, b1), add_to(d + 2 * Ci, b2), add_to(d + 3 * Ci, b3);
  }
}

// bias[o] += sum over the pixels [p0, p1) of grad[p, o].
DVPVAE_AVX2 void channel_sums(const float* __restrict g, float* __restrict bias, int64_t p0, int64_t p1,
                              int64_t Co) {
  int64_t o = 0;
  for (; o + kLanes <= Co; o += kLanes) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t p = p0; p < p1; ++p) s = _mm256_add_ps(s, _mm256_loadu_ps(g + p * Co + o));
    _mm256_storeu_ps(bias + o, _mm256_add_ps(_mm256_loadu_ps(bias + o), s));
  }
  for (; o < Co; ++o)
    for (int64_t p = p0; p < p1; ++p) bias[o] += g[p * Co + o];
}

// Accumulate the work items [w0, w1) (image-major, then row chunk) into out (Co, Ci) and
// bias (Co).
DVPVAE_AVX2 void wgrad_items(const float* __restrict g, const float* __restrict x, float* __restrict out,
                             float* __restrict bias, int64_t w0, int64_t w1, int64_t chunks, int64_t rows,
                             int64_t H, int64_t W, int64_t Co, int64_t Ci) {
  for (int64_t w = w0; w < w1; ++w) {
    const int64_t n = w / chunks, y0 = (w % chunks) * rows, y1 = std::min(H, y0 + rows);
    const float* gn = g + n * H * W * Co;
    const float* xn = x + n * H * W * Ci;
    for (int64_t o0 = 0; o0 < Co; o0 += kOutBlock) {
      int64_t i0 = 0;
      for (; i0 + 2 * kLanes <= Ci; i0 += 2 * kLanes) kernel_tile1<2>(gn, xn, out, y0, y1, W, Co, Ci, o0, i0);
      if (i0 < Ci) kernel_tile1<1>(gn, xn, out, y0, y1, W, Co, Ci, o0, i0);
    }
    channel_sums(gn, bias, y0 * W, y1 * W, Co);
  }
}
#endif

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                        int64_t kernel_size, int64_t tile) {
  TORCH_CHECK(cpu_has_avx2_fma(), "dvpvae.conv_cl_backward: the extension needs an x86-64 CPU with AVX2 and FMA");
  TORCH_CHECK(grad.dim() == 4 && input.dim() == 4, "dvpvae.conv_cl_backward: grad and input must be 4-D "
              "(N, C, H, W), got ", grad.sizes(), " and ", input.sizes());
  TORCH_CHECK(grad.scalar_type() == at::kFloat && input.scalar_type() == at::kFloat,
              "dvpvae.conv_cl_backward: grad and input must be float32, got ", grad.scalar_type(), " and ",
              input.scalar_type());
  CHECK_DEVICE(grad, input.device());
  const int64_t N = input.size(0), Ci = input.size(1), H = input.size(2), W = input.size(3), Co = grad.size(1);
  TORCH_CHECK(grad.size(0) == N && grad.size(2) == H && grad.size(3) == W,
              "dvpvae.conv_cl_backward: grad ", grad.sizes(), " does not match input ", input.sizes(),
              " (stride 1, 'same' padding: same N, H, W)");
  const auto cl = at::MemoryFormat::ChannelsLast;
  TORCH_CHECK(grad.is_contiguous(cl) && input.is_contiguous(cl),
              "dvpvae.conv_cl_backward: grad and input must be channels-last contiguous");
  const int64_t out_multiple = kernel_size == 3 ? kLanes : kOutBlock;
  TORCH_CHECK(Co % out_multiple == 0 && Ci % kLanes == 0, "dvpvae.conv_cl_backward with kernel_size ", kernel_size,
              " needs out channels % ", out_multiple, " == 0 and in channels % ", kLanes, " == 0, got ", Co, " and ",
              Ci);
  if (kernel_size == 3) {
    TORCH_CHECK(tile == 2 || tile == 4, "dvpvae.conv_cl_backward: the extension's 3x3 weight gradient is Winograd "
                "F(tile x tile, 3x3) and needs tile 2 or 4, got ", tile);
    return winograd_weight_grad(grad, input, tile);
  }
  const int64_t rows = std::clamp<int64_t>(64 / std::max<int64_t>(W, 1), 1, std::max<int64_t>(H, 1));
  const int64_t chunks = (H + rows - 1) / rows, items = N * chunks;
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), items));
  // Per thread: (Co, Ci) weight partials, then Co bias partials.
  const int64_t per_thread = Co * Ci + Co;
  at::Tensor partial = at::zeros({threads, per_thread}, input.options().memory_format(at::MemoryFormat::Contiguous));
  const float* g = grad.data_ptr<float>();
  const float* x = input.data_ptr<float>();
  float* out = partial.data_ptr<float>();
#if DVPVAE_HAVE_AVX2_KERNEL
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* buf = out + t * per_thread;
      wgrad_items(g, x, buf, buf + Co * Ci, items * t / threads, items * (t + 1) / threads, chunks, rows, H, W, Co,
                  Ci);
    }
  });
#endif
  const at::Tensor total = partial.sum(0);
  return {total.narrow(0, 0, Co * Ci).view({Co, Ci, 1, 1}).clone(), total.narrow(0, Co * Ci, Co).clone()};
}

}  // namespace dvpvae
