// The ops of the dvpvae extension, shared by their implementations and the binding
// (dvpvae_ext.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <tuple>

// Argument checks that raise a c10::Error (RuntimeError in Python) naming the argument.
#define CHECK_DEVICE(x, dev)                                                              \
  TORCH_CHECK((x).device() == (dev), "dvpvae: " #x " must be on ", (dev), ", got ", \
              (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), "dvpvae: " #x " must be contiguous, got strides ", (x).strides())

namespace dvpvae {

// The T-step ancestral loop of the diffusion prior with a native float32 CPU forward of
// dvpvae.unet.UNet (unet_cpu.cpp). `films` (T, blocks, 2, C) holds each time block's
// [1 + scale, shift] per step and `weights` the other parameters, both laid out by
// dvpvae/native_prior.py.
at::Tensor ddpm_sample_unet_cpu(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                const at::Tensor& films, at::TensorList weights, int64_t num_res_blocks,
                                int64_t groups, double eps, double temperature);
at::Tensor ddpm_sample_unet_meta(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                 const at::Tensor& films, at::TensorList weights, int64_t num_res_blocks,
                                 int64_t groups, double eps, double temperature);

// eps_hat = UNet(z, t) of dvpvae.unet.UNet for z (N, in_ch, H, W), float32 CPU, with the
// FiLM values of each row's t in `films` (N, blocks, 2, C) and the weights laid out as for
// ddpm_sample_unet.
at::Tensor unet_eps_cpu(const at::Tensor& z, const at::Tensor& films, at::TensorList weights,
                        int64_t num_res_blocks, int64_t groups, double eps);
at::Tensor unet_eps_meta(const at::Tensor& z, const at::Tensor& films, at::TensorList weights,
                         int64_t num_res_blocks, int64_t groups, double eps);

// The CPU provider's convolution (conv_cl_cpu.cpp): conv2d(x, weight, bias, padding = k / 2)
// for a (K, C, k, k) weight, k in (1, 3), on channels-last tensors (outputs channels-last).
// `tile` 2 or 4: the forward and input gradient by Winograd F(tile x tile, 3x3)
// (conv3x3_winograd_cpu), 0: by oneDNN. `extension`: the weight and bias gradients from
// conv_weight_grad_cpu, else from oneDNN. The backward returns (grad_x, grad_weight,
// grad_bias) for the passes in `mask` (input, weight and bias), an empty tensor for the others.
at::Tensor conv_cl_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t tile);
at::Tensor conv_cl_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t tile);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_cl_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& weight, int64_t tile,
                                                                    bool extension, std::array<bool, 2> mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_cl_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& weight, int64_t tile,
                                                                     bool extension, std::array<bool, 2> mask);

// Weight (Co, Ci, k, k) and bias (Co) gradients of a stride-1 convolution with a 1x1 or
// 3x3 (padding 1) kernel from channels-last float32 grad (N, Co, H, W) and input
// (N, Ci, H, W); Ci % 8 == 0, Co % 4 == 0 (1x1) or Co % 8 == 0 (3x3, by winograd_weight_grad
// with F(tile x tile, 3x3), tile 2 or 4; `tile` is unused for 1x1).
std::tuple<at::Tensor, at::Tensor> conv_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                        int64_t kernel_size, int64_t tile);

// A stride-1 3x3 convolution with zero-padding 1 by Winograd F(tile x tile, 3x3), tile 2 or 4
// (conv_winograd_cpu.cpp): channels-last float32 input (N, C, H, W), weight (K, C, 3, 3),
// optional bias (K); C % 8 == 0, K % 8 == 0. Returns channels-last (N, K, H, W).
at::Tensor conv3x3_winograd_cpu(const at::Tensor& input, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& bias, int64_t tile);

// Weight (K, C, 3, 3) and bias (K) gradients of that convolution by the transforms of
// F(tile x tile, 3x3) (conv_weight_grad_cpu's kernel_size 3, which checks the arguments):
// channels-last float32 grad (N, K, H, W) and input (N, C, H, W); C % 8 == 0, K % 8 == 0.
std::tuple<at::Tensor, at::Tensor> winograd_weight_grad(const at::Tensor& grad, const at::Tensor& input,
                                                        int64_t tile);

}  // namespace dvpvae
