// CUDA implementation of the fused DDPM step (MODEL.md section 5), plain CUDA C++ over raw
// pointers. The torch glue lives in ddpm_cuda_glue.cpp; see ddpm_cuda.h for why.
//
// Design: the step is elementwise and memory-bound (3 reads, 1 write per element), so one
// grid-stride kernel with 64-bit indices; the five coefficients of row `step` are loaded
// once per thread from the device table (a broadcast, served from L1/L2), in the
// accumulation type (fp32 for fp32 data, fp64 for fp64).
#include <cuda_runtime.h>

#include "ddpm_cuda.h"

namespace {

template <typename scalar_t, typename coef_t>
__global__ void ddpm_step_kernel(const scalar_t* __restrict__ z_t,
                                 const scalar_t* __restrict__ eps_hat,
                                 const scalar_t* __restrict__ noise,
                                 const coef_t* __restrict__ coef, int64_t step, int64_t T,
                                 scalar_t temperature, scalar_t* __restrict__ out,
                                 int64_t numel) {
  // Clamp instead of trusting the host: an out-of-range row must never read outside
  // the table (the host launcher also range-checks and raises).
  int64_t row = step < 0 ? 0 : (step >= T ? T - 1 : step);
  const coef_t* c = coef + row * 5;
  const scalar_t sigma_t = static_cast<scalar_t>(c[0]);
  const scalar_t inv_alpha_t = static_cast<scalar_t>(c[1]);
  const scalar_t c_z = static_cast<scalar_t>(c[2]);
  const scalar_t c_x = static_cast<scalar_t>(c[3]);
  const scalar_t c_n = temperature * static_cast<scalar_t>(c[4]);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    const scalar_t z = z_t[i];
    scalar_t x_hat = (z - sigma_t * eps_hat[i]) * inv_alpha_t;
    x_hat = x_hat < scalar_t(-1) ? scalar_t(-1) : (x_hat > scalar_t(1) ? scalar_t(1) : x_hat);
    out[i] = c_z * z + c_x * x_hat + c_n * noise[i];
  }
}

template <typename scalar_t>
int launch(const scalar_t* z_t, const scalar_t* eps_hat, const scalar_t* noise, const void* coef,
           int coef_is_double, int64_t step, int64_t T, scalar_t temperature, scalar_t* out,
           int64_t numel, void* stream) {
  if (numel <= 0) return 0;
  const int threads = 256;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers
  // the rest, so the launch never overflows gridDim.x for huge tensors.
  int64_t blocks = (numel + threads - 1) / threads;
  if (blocks > 65535) blocks = 65535;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (coef_is_double) {
    ddpm_step_kernel<scalar_t, double><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        z_t, eps_hat, noise, static_cast<const double*>(coef), step, T, temperature, out, numel);
  } else {
    ddpm_step_kernel<scalar_t, float><<<static_cast<unsigned>(blocks), threads, 0, s>>>(
        z_t, eps_hat, noise, static_cast<const float*>(coef), step, T, temperature, out, numel);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int dvpvae_ddpm_step_cuda_f32(const float* z_t, const float* eps_hat,
                                         const float* noise, const void* coef, int coef_is_double,
                                         int64_t step, int64_t T, float temperature, float* out,
                                         int64_t numel, void* stream) {
  return launch<float>(z_t, eps_hat, noise, coef, coef_is_double, step, T, temperature, out,
                       numel, stream);
}

extern "C" int dvpvae_ddpm_step_cuda_f64(const double* z_t, const double* eps_hat,
                                         const double* noise, const void* coef,
                                         int coef_is_double, int64_t step, int64_t T,
                                         double temperature, double* out, int64_t numel,
                                         void* stream) {
  return launch<double>(z_t, eps_hat, noise, coef, coef_is_double, step, T, temperature, out,
                        numel, stream);
}

extern "C" const char* dvpvae_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
