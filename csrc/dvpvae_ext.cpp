// Binding of the dvpvae C++ extension: torch.library schemas and the CPU / Meta kernels.
//
// Registered with TORCH_LIBRARY (not pybind11) so that the ops are reachable as
// torch.ops.dvpvae.* and torch.compile sees them as opaque ops with Meta kernels; the
// build needs only torch/library.h and a few ATen headers, not torch/extension.h.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(dvpvae, m) {
  m.def("ddpm_sample_unet(Tensor z_T, Tensor noise, Tensor coef, Tensor films, Tensor[] weights, "
        "int num_res_blocks, int groups, float eps, float temperature) -> Tensor");
  m.def("unet_eps(Tensor z, Tensor films, Tensor[] weights, int num_res_blocks, int groups, float eps) -> Tensor");
  // Inductor must hand these ops the channels-last strides their kernels require.
  const std::vector<at::Tag> exact_strides{at::Tag::needs_exact_strides};
  m.def("conv_cl(Tensor x, Tensor weight, Tensor? bias, int tile) -> Tensor", exact_strides);
  m.def("conv_cl_backward(Tensor grad, Tensor x, Tensor weight, int tile, bool extension, bool[2] output_mask) "
        "-> (Tensor, Tensor, Tensor)", exact_strides);
}

TORCH_LIBRARY_IMPL(dvpvae, CPU, m) {
  m.impl("ddpm_sample_unet", &dvpvae::ddpm_sample_unet_cpu);
  m.impl("unet_eps", &dvpvae::unet_eps_cpu);
  m.impl("conv_cl", &dvpvae::conv_cl_cpu);
  m.impl("conv_cl_backward", &dvpvae::conv_cl_backward_cpu);
}

TORCH_LIBRARY_IMPL(dvpvae, Meta, m) {
  m.impl("ddpm_sample_unet", &dvpvae::ddpm_sample_unet_meta);
  m.impl("unet_eps", &dvpvae::unet_eps_meta);
  m.impl("conv_cl", &dvpvae::conv_cl_meta);
  m.impl("conv_cl_backward", &dvpvae::conv_cl_backward_meta);
}

// A Python module init so the library imports as `dvpvae._C`; the static initialisers
// above register the ops when it is loaded, so the module itself has no attributes.
static struct PyModuleDef dvpvae_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "dvpvae C++ ops: see torch.ops.dvpvae", -1,
                                             nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dvpvae_c_module); }
