// C ABI between the torch-free CUDA kernels (ddpm_cuda.cu) and the torch glue
// (ddpm_cuda_glue.cpp). Kept to raw pointers and plain integers so the .cu file compiles
// with nvcc alone (`nvcc -c -arch=sm_90 csrc/ddpm_cuda.cu`), without torch headers and
// without a CUDA build of torch: the CPU-only machines we develop on can still check it.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One ancestral step z_s = c_z z_t + c_x clamp((z_t - sigma_t eps_hat)/alpha_t, -1, 1)
//                         + temperature c_noise noise
// over `numel` contiguous elements. `coef` points to the (T, 5) table on the device, in
// float32 (coef_is_double = 0) or float64; row `step` is read inside the kernel, so the
// host never copies schedule values per step. Returns 0 or a cudaError_t value.
int dvpvae_ddpm_step_cuda_f32(const float* z_t, const float* eps_hat, const float* noise,
                              const void* coef, int coef_is_double, int64_t step, int64_t T,
                              float temperature, float* out, int64_t numel, void* stream);
int dvpvae_ddpm_step_cuda_f64(const double* z_t, const double* eps_hat, const double* noise,
                              const void* coef, int coef_is_double, int64_t step, int64_t T,
                              double temperature, double* out, int64_t numel, void* stream);
// Human-readable text for a value returned above.
const char* dvpvae_cuda_error_string(int code);

#ifdef __cplusplus
}
#endif
