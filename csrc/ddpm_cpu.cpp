// CPU implementation of DDPM sampling for the diffusion prior (MODEL.md section 5):
//   * the coefficient table for (T, gamma_min, gamma_max), in float64;
//   * the fused per-step update (one pass over z_t, eps_hat, noise), at::parallel_for;
//   * the T-step loop, which calls the denoising UNet through an AOTInductor package
//     without returning to Python between steps.
//
// Why AOTInductor and weights as inputs (measured on the 2-core CI machine, MNIST prior,
// N = 16): a C++ loop over a TorchScript UNet is only ~1.2x faster than the Python loop
// because each UNet op still goes through the dispatcher one by one; an AOTInductor
// package fuses GroupNorm/SiLU/FiLM/residual chains into generated C++ loops and calls
// the 3x3 convolutions directly, ~2x faster per UNet call. The package is exported with
// the UNet's parameters as *inputs* (not frozen constants): training changes the weights
// every step, and a package with baked-in weights would have to be recompiled (~30 s)
// or its constant buffers swapped before every call. Passing them as inputs costs nothing
// measurable here (freezing gave the same speed: the convolutions are extern ATen calls
// either way), so a package depends only on the architecture and stays valid forever.
//
// Where the time goes (MNIST prior, N = 16, 1 thread, ~1.75 ms per step): 95% is the 21
// oneDNN convolutions the package calls through ATen (~85 us each); ONEDNN_VERBOSE shows
// ~20 us of that inside the brgconv kernel, the rest is per-call primitive-descriptor and
// weight-reorder work in torch's mkldnn wrapper. The loop itself (this file) costs a few
// us per step. That is why float32 CPU priors of dvpvae.unet.UNet take the native forward
// of unet_cpu.cpp instead (no per-call set-up); this loop serves every other prior.
#include "ddpm.h"

#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <unordered_map>

namespace dvpvae {

// ---------------------------------------------------------------------------- table
namespace {
// log(1 + e^g) without overflow for large g (gamma reaches 7..10 here, but the table is
// public API and callers may pass anything).
double softplus(double g) { return std::max(g, 0.0) + std::log1p(std::exp(-std::fabs(g))); }
double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
}  // namespace

at::Tensor ddpm_coefficients(int64_t T, double gamma_min, double gamma_max) {
  TORCH_CHECK(T > 0, "dvpvae.ddpm_coefficients: T must be positive, got ", T);
  TORCH_CHECK(gamma_min < gamma_max, "dvpvae.ddpm_coefficients: need gamma_min < gamma_max, got ",
              gamma_min, " and ", gamma_max);
  at::Tensor table = at::empty({T, kNumCols}, at::TensorOptions().dtype(at::kDouble));
  double* c = table.data_ptr<double>();
  const double span = gamma_max - gamma_min;
  for (int64_t i = 0; i < T; ++i) {
    const double g_t = gamma_min + span * (static_cast<double>(i + 1) / static_cast<double>(T));
    const double g_s = gamma_min + span * (static_cast<double>(i) / static_cast<double>(T));
    // alpha^2 = sigmoid(-g) = exp(-softplus(g)): accurate even when alpha is tiny.
    const double alpha_t = std::exp(-0.5 * softplus(g_t));
    const double alpha_s = std::exp(-0.5 * softplus(g_s));
    const double sigma2_s = sigmoid(g_s);
    // sigma_ts^2 / sigma_t^2 = 1 - (alpha_t/alpha_s)^2 sigma_s^2/sigma_t^2 = 1 - e^(g_s - g_t);
    // expm1 avoids the cancellation of the direct form when the steps are small.
    const double ratio = -std::expm1(g_s - g_t);
    double* row = c + i * kNumCols;
    row[kSigmaT] = std::sqrt(sigmoid(g_t));
    row[kInvAlphaT] = 1.0 / alpha_t;
    row[kCZ] = (1.0 - ratio) * alpha_s / alpha_t;  // a_ts sigma_s^2 / sigma_t^2
    row[kCX] = alpha_s * ratio;                     // alpha_s sigma_ts^2 / sigma_t^2
    row[kCNoise] = std::sqrt(ratio * sigma2_s);     // sqrt(sigma_ts^2 sigma_s^2 / sigma_t^2)
  }
  return table;
}

// ---------------------------------------------------------------------------- step
void check_step_args(const at::Tensor& z_t, const at::Tensor& eps_hat, const at::Tensor& noise,
                     const at::Tensor& coef, int64_t step) {
  CHECK_SHAPE(eps_hat, z_t.sizes());
  CHECK_SHAPE(noise, z_t.sizes());
  CHECK_DEVICE(eps_hat, z_t.device());
  CHECK_DEVICE(noise, z_t.device());
  CHECK_DEVICE(coef, z_t.device());
  TORCH_CHECK(eps_hat.scalar_type() == z_t.scalar_type() && noise.scalar_type() == z_t.scalar_type(),
              "dvpvae.ddpm_step: z_t, eps_hat and noise must share one dtype, got ",
              z_t.scalar_type(), ", ", eps_hat.scalar_type(), ", ", noise.scalar_type());
  TORCH_CHECK(z_t.scalar_type() == at::kFloat || z_t.scalar_type() == at::kDouble,
              "dvpvae.ddpm_step: dtype must be float32 or float64, got ", z_t.scalar_type());
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == kNumCols && coef.size(0) >= 1,
              "dvpvae.ddpm_step: coef must be the (T, 5) table of ddpm_coefficients with T >= 1, "
              "got shape ", coef.sizes());
  TORCH_CHECK(coef.scalar_type() == at::kFloat || coef.scalar_type() == at::kDouble,
              "dvpvae.ddpm_step: coef must be float32 or float64, got ", coef.scalar_type());
  CHECK_CONTIGUOUS(z_t);
  CHECK_CONTIGUOUS(eps_hat);
  CHECK_CONTIGUOUS(noise);
  CHECK_CONTIGUOUS(coef);
  TORCH_CHECK(step >= 0 && step < coef.size(0), "dvpvae.ddpm_step: step ", step,
              " outside [0, ", coef.size(0) - 1, "] (row i is the step t=(i+1)/T -> s=i/T)");
}

int64_t check_loop_args(const char* op, const at::Tensor& z_T, const at::Tensor& noise,
                        const at::Tensor& coef) {
  TORCH_CHECK(coef.dim() == 2 && coef.size(1) == kNumCols, op, ": coef must be a (T, 5) table, got shape ",
              coef.sizes());
  const int64_t T = coef.size(0);
  TORCH_CHECK(T > 0, op, ": T must be positive, got ", T);
  TORCH_CHECK(z_T.dim() >= 1 && z_T.size(0) >= 1, op, ": z_T must be (N, ...) with N >= 1, got shape ",
              z_T.sizes());
  std::vector<int64_t> noise_shape{T};
  noise_shape.insert(noise_shape.end(), z_T.sizes().begin(), z_T.sizes().end());
  TORCH_CHECK(noise.sizes() == c10::IntArrayRef(noise_shape), op, ": noise must have shape ",
              c10::IntArrayRef(noise_shape), " = (T,) + z_T.shape, got ", noise.sizes());
  CHECK_DEVICE(noise, z_T.device());
  CHECK_DEVICE(coef, z_T.device());
  CHECK_CONTIGUOUS(z_T);
  CHECK_CONTIGUOUS(noise);
  return T;
}

namespace {
template <typename scalar_t>
void step_kernel(const scalar_t* z_t, const scalar_t* eps_hat, const scalar_t* noise,
                 const double* row, double temperature, scalar_t* out, int64_t numel) {
  // fp32 data is updated in fp32 (as the eager reference does), fp64 in fp64.
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t sigma_t = static_cast<acc_t>(row[kSigmaT]);
  const acc_t inv_alpha_t = static_cast<acc_t>(row[kInvAlphaT]);
  const acc_t c_z = static_cast<acc_t>(row[kCZ]);
  const acc_t c_x = static_cast<acc_t>(row[kCX]);
  // The reference forms temperature * c_noise in the table's dtype before the multiply.
  const acc_t c_n = static_cast<acc_t>(temperature) * static_cast<acc_t>(row[kCNoise]);
  // Small grain: N*C*c*c is a few thousand elements for the paper's priors, where thread
  // start-up would cost more than the work; at::parallel_for runs inline below the grain.
  constexpr int64_t kGrain = 32768;
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      out[i] = static_cast<scalar_t>(ddpm_update<acc_t>(z_t[i], eps_hat[i], noise[i], sigma_t, inv_alpha_t,
                                                         c_z, c_x, c_n));
    }
  });
}
}  // namespace

at::Tensor ddpm_step_cpu(const at::Tensor& z_t, const at::Tensor& eps_hat, const at::Tensor& noise,
                         const at::Tensor& coef, int64_t step, double temperature) {
  TORCH_CHECK(z_t.device().is_cpu(), "dvpvae.ddpm_step (CPU kernel): z_t is on ", z_t.device());
  check_step_args(z_t, eps_hat, noise, coef, step);
  // Read the five coefficients of row `step` as doubles (a float32 table keeps its float32
  // values exactly, so the result matches the reference that uses the float32 buffer).
  double row[kNumCols];
  AT_DISPATCH_FLOATING_TYPES(coef.scalar_type(), "ddpm_step_coef", [&] {
    const scalar_t* c = coef.const_data_ptr<scalar_t>() + step * kNumCols;
    for (int64_t j = 0; j < kNumCols; ++j) row[j] = static_cast<double>(c[j]);
  });
  if (z_t.scalar_type() == at::kFloat) {
    // Round the row to fp32 first: the reference multiplies fp32 tensors by fp32 table entries.
    for (double& v : row) v = static_cast<double>(static_cast<float>(v));
  }
  at::Tensor out = at::empty_like(z_t);
  AT_DISPATCH_FLOATING_TYPES(z_t.scalar_type(), "ddpm_step_cpu", [&] {
    step_kernel<scalar_t>(z_t.const_data_ptr<scalar_t>(), eps_hat.const_data_ptr<scalar_t>(),
                          noise.const_data_ptr<scalar_t>(), row, temperature,
                          out.mutable_data_ptr<scalar_t>(), z_t.numel());
  });
  return out;
}

at::Tensor ddpm_step_meta(const at::Tensor& z_t, const at::Tensor& eps_hat, const at::Tensor& noise,
                          const at::Tensor& coef, int64_t step, double temperature) {
  // Shape/device rules only: meta tensors have no data (and sizes may be symbolic). The
  // device checks also catch a real tensor mixed with a meta one, which dispatches here.
  CHECK_DEVICE(eps_hat, z_t.device());
  CHECK_DEVICE(noise, z_t.device());
  CHECK_DEVICE(coef, z_t.device());
  TORCH_CHECK(eps_hat.sym_sizes() == z_t.sym_sizes() && noise.sym_sizes() == z_t.sym_sizes(),
              "dvpvae.ddpm_step: z_t, eps_hat and noise must have one shape");
  TORCH_CHECK(coef.dim() == 2 && coef.sym_size(1) == kNumCols,
              "dvpvae.ddpm_step: coef must be a (T, 5) table");
  return at::empty_like(z_t);
}

// ---------------------------------------------------------------------------- loop
namespace {
struct LoaderEntry {
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  // One runner per package: concurrent sampling calls on the same package take turns.
  std::mutex run_mutex;
};

std::mutex& cache_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<std::string, std::shared_ptr<LoaderEntry>>& cache() {
  static std::unordered_map<std::string, std::shared_ptr<LoaderEntry>> c;
  return c;
}

// Loading a package unzips it and dlopens the model .so (~0.1 s), so loaders are cached
// per (path, device). Packages are content-addressed by the Python side (the path holds
// the architecture hash), so a path never changes meaning and needs no invalidation.
std::shared_ptr<LoaderEntry> get_loader(const std::string& path, const c10::Device& device) {
  const std::string key = path + "|" + device.str();
  std::lock_guard<std::mutex> lock(cache_mutex());
  auto it = cache().find(key);
  if (it != cache().end()) return it->second;
  auto entry = std::make_shared<LoaderEntry>();
  entry->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
      path, "model", /*run_single_threaded=*/false, /*num_runners=*/1,
      device.is_cpu() ? c10::DeviceIndex(-1) : device.index());
  cache().emplace(key, entry);
  return entry;
}

using StepFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t, double);
}  // namespace

int64_t release_packages() {
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto n = static_cast<int64_t>(cache().size());
  cache().clear();
  return n;
}

at::Tensor ddpm_sample_aoti(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                            at::TensorList weights, c10::string_view package, double temperature) {
  const int64_t T = check_loop_args("dvpvae.ddpm_sample", z_T, noise, coef);
  TORCH_CHECK(noise.scalar_type() == z_T.scalar_type(), "dvpvae.ddpm_sample: noise dtype ",
              noise.scalar_type(), " != z_T dtype ", z_T.scalar_type());
  for (size_t j = 0; j < weights.size(); ++j) {
    TORCH_CHECK(weights[j].device() == z_T.device(), "dvpvae.ddpm_sample: weights[", j, "] is on ",
                weights[j].device(), ", expected ", z_T.device());
    // The package was compiled for the parameters' (contiguous) strides.
    TORCH_CHECK(weights[j].is_contiguous(), "dvpvae.ddpm_sample: weights[", j, "] must be contiguous");
  }
  TORCH_CHECK(!package.empty(), "dvpvae.ddpm_sample: empty package path");

  c10::DeviceGuard guard(z_T.device());
  auto entry = get_loader(std::string(package), z_T.device());
  static auto step_op = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("dvpvae::ddpm_step", "")
                            .typed<StepFn>();

  const int64_t n = z_T.size(0);
  std::vector<at::Tensor> inputs;
  inputs.reserve(2 + weights.size());
  inputs.push_back(z_T);
  inputs.push_back(at::Tensor());
  for (const auto& w : weights) inputs.push_back(w);

  std::lock_guard<std::mutex> lock(entry->run_mutex);
  at::Tensor z = z_T;
  for (int64_t k = 0; k < T; ++k) {
    const int64_t i = T - 1 - k;  // row i: t = (i+1)/T -> s = i/T; noise row k = T-1-i
    inputs[0] = z;
    // Same value as the reference's torch.full((n,), (i+1)/T): a double rounded to dtype.
    inputs[1] = at::full({n}, static_cast<double>(i + 1) / static_cast<double>(T), z.options());
    std::vector<at::Tensor> out = entry->loader->run(inputs);
    TORCH_CHECK(out.size() == 1, "dvpvae.ddpm_sample: the package returned ", out.size(),
                " outputs, expected 1 (eps_hat)");
    at::Tensor eps_hat = out[0].is_contiguous() ? out[0] : out[0].contiguous();
    TORCH_CHECK(eps_hat.sizes() == z.sizes(), "dvpvae.ddpm_sample: the network returned shape ",
                eps_hat.sizes(), " for input shape ", z.sizes());
    z = step_op.call(z, eps_hat, noise.select(0, k), coef, i, temperature);
  }
  return z;
}

at::Tensor ddpm_sample_meta(const at::Tensor& z_T, const at::Tensor& noise, const at::Tensor& coef,
                            at::TensorList weights, c10::string_view package, double temperature) {
  TORCH_CHECK(coef.dim() == 2, "dvpvae.ddpm_sample: coef must be a (T, 5) table");
  CHECK_DEVICE(noise, z_T.device());
  CHECK_DEVICE(coef, z_T.device());
  return at::empty_like(z_T);
}

}  // namespace dvpvae
