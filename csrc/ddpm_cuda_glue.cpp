// Torch glue for the CUDA kernels in ddpm_cuda.cu; compiled only in CUDA builds
// (setup.py adds it with CUDAExtension). The kernels expose a C ABI over raw pointers so
// the .cu file needs no torch headers; this file checks arguments, picks the current
// stream, and registers the CUDA dispatch-key implementations.
// c10/cuda headers only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE): the
// stream and the device guard are all this file needs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ddpm.h"
#include "ddpm_cuda.h"

namespace dvpvae {

at::Tensor ddpm_step_cuda(const at::Tensor& z_t, const at::Tensor& eps_hat, const at::Tensor& noise,
                          const at::Tensor& coef, int64_t step, double temperature) {
  TORCH_CHECK(z_t.is_cuda(), "dvpvae.ddpm_step (CUDA kernel): z_t is on ", z_t.device());
  check_step_args(z_t, eps_hat, noise, coef, step);
  c10::cuda::CUDAGuard guard(z_t.device());
  at::Tensor out = at::empty_like(z_t);
  void* stream = c10::cuda::getCurrentCUDAStream(z_t.device().index()).stream();
  const int coef_is_double = coef.scalar_type() == at::kDouble;
  int err = 0;
  if (z_t.scalar_type() == at::kFloat) {
    err = dvpvae_ddpm_step_cuda_f32(z_t.const_data_ptr<float>(), eps_hat.const_data_ptr<float>(),
                                    noise.const_data_ptr<float>(), coef.const_data_ptr(),
                                    coef_is_double, step, coef.size(0),
                                    static_cast<float>(temperature),
                                    out.mutable_data_ptr<float>(), z_t.numel(), stream);
  } else {
    err = dvpvae_ddpm_step_cuda_f64(z_t.const_data_ptr<double>(), eps_hat.const_data_ptr<double>(),
                                    noise.const_data_ptr<double>(), coef.const_data_ptr(),
                                    coef_is_double, step, coef.size(0), temperature,
                                    out.mutable_data_ptr<double>(), z_t.numel(), stream);
  }
  TORCH_CHECK(err == 0, "dvpvae.ddpm_step: CUDA launch failed: ", dvpvae_cuda_error_string(err));
  return out;
}

}  // namespace dvpvae

TORCH_LIBRARY_IMPL(dvpvae, CUDA, m) {
  m.impl("ddpm_step", &dvpvae::ddpm_step_cuda);
  // The loop is device-agnostic: AOTInductor runs a CUDA package and the step dispatches
  // to ddpm_step_cuda above.
  m.impl("ddpm_sample", &dvpvae::ddpm_sample_aoti);
}
