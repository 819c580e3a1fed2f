// Declarations shared by the binding (dvpvae_ext.cpp), the CPU implementation
// (ddpm_cpu.cpp) and the CUDA glue (ddpm_cuda_glue.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

// Argument checks that raise a c10::Error (RuntimeError in Python) naming the argument,
// in the style of FlashAttention's flash_api.cpp.
#define CHECK_DEVICE(x, dev)                                                              \
  TORCH_CHECK((x).device() == (dev), "dvpvae: " #x " must be on ", (dev), ", got ", \
              (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), "dvpvae: " #x " must be contiguous, got strides ", (x).strides())
#define CHECK_SHAPE(x, ...)                                                                 \
  TORCH_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}), "dvpvae: " #x " must have shape ", \
              c10::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

namespace dvpvae {

// Columns of the (T, 5) step table; row i is the step t = (i+1)/T -> s = i/T.
// Same layout as kernels/ddpm_step.py (COL_*) and DiffusionPrior.coefficients.
enum Col : int64_t { kSigmaT = 0, kInvAlphaT = 1, kCZ = 2, kCX = 3, kCNoise = 4, kNumCols = 5 };

// One ancestral update of one element (row i of the table, c_n = temperature * c_noise):
// z_s = c_z z + c_x clamp((z - sigma_t eps_hat) / alpha_t, -1, 1) + c_n noise.
// Shared by ddpm_step_cpu and the native UNet loop so both round alike.
template <typename acc_t>
inline acc_t ddpm_update(acc_t z, acc_t eps_hat, acc_t noise, acc_t sigma_t, acc_t inv_alpha_t, acc_t c_z,
                         acc_t c_x, acc_t c_n) {
  acc_t x_hat = (z - sigma_t * eps_hat) * inv_alpha_t;
  x_hat = std::min(std::max(x_hat, acc_t(-1)), acc_t(1));
  return c_z * z + c_x * x_hat + c_n * noise;
}

// float64 CPU table (T, 5) for the linear log-SNR schedule.
at::Tensor ddpm_coefficients(int64_t T, double gamma_min, double gamma_max);

// Shared validation of ddpm_step's arguments (shapes, dtypes, devices, contiguity, step).
void check_step_args(const at::Tensor& z_t, const at::Tensor& eps_hat, const at::Tensor& noise,
                     const at::Tensor& coef, int64_t step);

// Shared validation of the T-step loops' arguments: coef a (T, 5) table with T >= 1, z_T
// (N, ...) with N >= 1, noise (T,) + z_T.shape, all on z_T's device, z_T and noise
// contiguous. `op` prefixes the messages. Returns T.
int64_t check_loop_args(const char* op, const at::Tensor& z_T, const at::Tensor& noise,
                        const at::Tensor& coef);

at::Tensor ddpm_step_cpu(const at::Tensor& z_t, const at::Tensor& eps_hat,
                         const at::Tensor& noise, const at::Tensor& coef, int64_t step,
                         double temperature);
at::Tensor ddpm_step_meta(const at::Tensor& z_t, const at::Tensor& eps_hat,
                          const at::Tensor& noise, const at::Tensor& coef, int64_t step,
                          double temperature);

// The whole T-step ancestral loop; the denoiser is an AOTInductor package that takes
// (z_t, t, *weights). Device-agnostic: the step goes through the dispatcher, so the
// same function serves the CPU and CUDA registrations.
at::Tensor ddpm_sample_aoti(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                            at::TensorList weights, c10::string_view package, double temperature);
at::Tensor ddpm_sample_meta(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                            at::TensorList weights, c10::string_view package, double temperature);
// The same loop with a native float32 CPU forward of dvpvae.unet.UNet (unet_cpu.cpp);
// weights in UNet.named_parameters() order.
at::Tensor ddpm_sample_unet_cpu(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                at::TensorList weights, int64_t num_res_blocks, int64_t groups, double eps,
                                double temperature);
at::Tensor ddpm_sample_unet_meta(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                                 at::TensorList weights, int64_t num_res_blocks, int64_t groups, double eps,
                                 double temperature);
// Drop every cached package loader; returns how many were dropped.
int64_t release_packages();

// Weight (Co, Ci, k, k) and bias (Co) gradients of a stride-1 convolution with a 1x1 or
// 3x3 (padding 1) kernel from channels-last float32 grad (N, Co, H, W) and input
// (N, Ci, H, W); Co % 4 == 0, Ci % 8 == 0.
std::tuple<at::Tensor, at::Tensor> conv_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& input,
                                                        int64_t kernel_size);
std::tuple<at::Tensor, at::Tensor> conv_weight_grad_meta(const at::Tensor& grad, const at::Tensor& input,
                                                         int64_t kernel_size);

}  // namespace dvpvae
