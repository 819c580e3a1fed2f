"""Fused kernels of the DVP-VAE fast path, one op per module, each beside its reference.

Triton is optional: each op module imports it inside try/except, so ``import kernels``
works without it and every op falls back to its reference.
"""
from kernels._backend import available_backends, use_backend
from kernels.conv1x1_act import conv1x1_act
from kernels.conv1x1_residual import conv1x1_residual
from kernels.dct_pseudoinput import dct_pseudoinput, idct_pseudoinput
from kernels.ddpm_step import ddpm_coefficients, ddpm_step
from kernels.reparam_kl import reparam_kl, reparam_sample

__all__ = ["available_backends", "use_backend",
           "conv1x1_act", "conv1x1_residual", "dct_pseudoinput", "idct_pseudoinput",
           "ddpm_coefficients", "ddpm_step", "reparam_kl", "reparam_sample"]
