// Binding of the dvpvae C++ extension: torch.library schemas and the CPU / Meta kernels.
//
// Registered with TORCH_LIBRARY (not pybind11) so that
//   * the ops are reachable as torch.ops.dvpvae.* from Python and from C++,
//   * torch.compile sees them as opaque ops with Meta kernels (no graph breaks),
//   * the build includes torch/library.h and a few ATen headers instead of
//     torch/extension.h (13 s instead of 57 s of compile time on the CI machine).
// The CUDA kernels are registered by ddpm_cuda_glue.cpp, compiled only in CUDA builds.
#include <Python.h>
#include <torch/library.h>

#include "ddpm.h"

TORCH_LIBRARY(dvpvae, m) {
  // ddpm_step and ddpm_sample get C++ Meta kernels below (FakeTensor uses them under
  // torch.compile); ddpm_coefficients has no tensor inputs, its fake is in dvpvae/_ext.py.
  m.def("ddpm_coefficients(int T, float gamma_min, float gamma_max) -> Tensor");
  m.def("ddpm_step(Tensor z_t, Tensor eps_hat, Tensor noise, Tensor coef, int step, "
        "float temperature) -> Tensor");
  m.def("ddpm_sample(Tensor z_T, Tensor noise, Tensor coef, Tensor[] weights, str package, "
        "float temperature) -> Tensor");
  m.def("ddpm_sample_unet(Tensor z_T, Tensor noise, Tensor coef, Tensor[] weights, int num_res_blocks, "
        "int groups, float eps, float temperature) -> Tensor");
  m.def("release_packages() -> int");
  m.def("conv_weight_grad(Tensor grad, Tensor input, int kernel_size) -> (Tensor, Tensor)");
}

// Ops without tensor arguments dispatch to CompositeExplicitAutograd.
TORCH_LIBRARY_IMPL(dvpvae, CompositeExplicitAutograd, m) {
  m.impl("ddpm_coefficients", &dvpvae::ddpm_coefficients);
  m.impl("release_packages", &dvpvae::release_packages);
}

TORCH_LIBRARY_IMPL(dvpvae, CPU, m) {
  m.impl("ddpm_step", &dvpvae::ddpm_step_cpu);
  m.impl("ddpm_sample", &dvpvae::ddpm_sample_aoti);
  m.impl("ddpm_sample_unet", &dvpvae::ddpm_sample_unet_cpu);
  m.impl("conv_weight_grad", &dvpvae::conv_weight_grad_cpu);
}

TORCH_LIBRARY_IMPL(dvpvae, Meta, m) {
  m.impl("ddpm_step", &dvpvae::ddpm_step_meta);
  m.impl("ddpm_sample", &dvpvae::ddpm_sample_meta);
  m.impl("ddpm_sample_unet", &dvpvae::ddpm_sample_unet_meta);
  m.impl("conv_weight_grad", &dvpvae::conv_weight_grad_meta);
}

// A Python module init so the extension imports as `dvpvae._C` (setup.py build); the ops
// are registered by the static initialisers above when the library is loaded, so the
// module itself has no attributes. The JIT build loads the same library with
// torch.ops.load_library instead.
static struct PyModuleDef dvpvae_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "dvpvae C++ ops: see torch.ops.dvpvae", -1,
                                             nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dvpvae_c_module); }
