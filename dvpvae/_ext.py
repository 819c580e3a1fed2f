"""Loader for the optional compiled extension (see csrc/ and setup.py).

The extension registers ``torch.ops.dvpvae.*``:

  ddpm_coefficients(T, gamma_min, gamma_max) -> (T, 5) float64 step table
  ddpm_step(z_t, eps_hat, noise, coef, step, temperature) -> z_s    (CPU, CUDA builds: CUDA)
  ddpm_sample(z_T, noise, coef, weights, package, temperature) -> u (the T-step loop)
  ddpm_sample_unet(z_T, noise, coef, weights, num_res_blocks, groups, eps, temperature) -> u
      (the same loop with a native float32 CPU forward of dvpvae.unet.UNet)
  release_packages() -> number of cached AOTInductor loaders dropped
  conv_weight_grad(grad, input, kernel_size) -> (weight grad (Co, Ci, k, k), bias grad (Co,)) of a
      stride-1 1x1 or 3x3 padding-1 convolution on channels-last float32 tensors (CPU;
      dvpvae.cpu_conv uses it)

Where it comes from, in order:
  1. the prebuilt ``dvpvae._C`` (``pip install --no-build-isolation -e .``);
  2. a JIT build with ``torch.utils.cpp_extension.load`` into a cache directory, only when
     asked: ``DVPVAE_JIT_BUILD=1`` in the environment or an explicit ``build()`` call
     (a first build takes ~45 s on 2 cores, far too slow to happen on ``import dvpvae``);
  3. nothing: ``load()`` returns None and every caller falls back to plain PyTorch.
"""
from __future__ import annotations

import importlib
import os
import threading

import torch

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_SOURCES = ("dvpvae_ext.cpp", "ddpm_cpu.cpp", "unet_cpu.cpp", "conv_wgrad_cpu.cpp")

_lock = threading.Lock()
_ops = None
_tried = False
_origin = None  # "prebuilt" | "jit" | None
_error = None  # why the last attempt failed, for error messages


class _Ops:
    """Python face of the extension: thin wrappers over ``torch.ops.dvpvae``."""

    def __init__(self, origin: str):
        self.origin = origin

    @staticmethod
    def ddpm_coefficients(T: int, gamma_min: float, gamma_max: float) -> torch.Tensor:
        return torch.ops.dvpvae.ddpm_coefficients(int(T), float(gamma_min), float(gamma_max))

    @staticmethod
    def ddpm_step(z_t, eps_hat, noise, coef, step, temperature=1.0) -> torch.Tensor:
        # A 0-dim step tensor (the Triton path's no-sync form) is read on the host here: the
        # C++ op is a CPU/CUDA kernel with an int row index.
        if isinstance(step, torch.Tensor):
            step = int(step)
        return torch.ops.dvpvae.ddpm_step(z_t, eps_hat, noise, coef, step, float(temperature))

    @staticmethod
    def ddpm_sample(z_T, noise, coef, weights, package, temperature=1.0) -> torch.Tensor:
        return torch.ops.dvpvae.ddpm_sample(z_T, noise, coef, list(weights), str(package),
                                            float(temperature))

    @staticmethod
    def ddpm_sample_unet(z_T, noise, coef, weights, num_res_blocks, groups, eps, temperature=1.0) -> torch.Tensor:
        return torch.ops.dvpvae.ddpm_sample_unet(z_T, noise, coef, list(weights), int(num_res_blocks),
                                                 int(groups), float(eps), float(temperature))

    @staticmethod
    def release_packages() -> int:
        return torch.ops.dvpvae.release_packages()


def _register_fakes() -> None:
    # ddpm_step / ddpm_sample / ddpm_sample_unet have C++ Meta kernels; the table op has no tensor inputs, so
    # FakeTensorMode needs a Python fake to know its output shape.
    try:
        @torch.library.register_fake("dvpvae::ddpm_coefficients")
        def _(T, gamma_min, gamma_max):
            return torch.empty((T, 5), dtype=torch.float64)
    except RuntimeError:  # already registered (library loaded twice in one process)
        pass


def _step_setup_context(ctx, inputs, output):
    z_t, eps_hat, noise, coef, step, temperature = inputs
    ctx.save_for_backward(z_t, eps_hat, coef)
    ctx.step, ctx.temperature = step, temperature


def _step_backward(ctx, grad):
    # z_s = c_z z + c_x clamp((z - sigma eps_hat) / alpha, -1, 1) + temperature c_noise noise;
    # torch.clamp passes the gradient on the closed interval [-1, 1]. Written with torch ops:
    # the backward is rare (sampling runs under no_grad) and this keeps the C++ side small.
    z_t, eps_hat, coef = ctx.saved_tensors
    sigma_t, inv_alpha_t, c_z, c_x, c_noise = coef[ctx.step].to(grad.dtype).unbind(0)
    pre = (z_t - sigma_t * eps_hat) * inv_alpha_t
    g_pre = torch.where((pre >= -1) & (pre <= 1), grad * c_x, torch.zeros_like(grad)) * inv_alpha_t
    return grad * c_z + g_pre, -sigma_t * g_pre, grad * (ctx.temperature * c_noise), None, None, None


def _register_python_parts() -> None:
    _register_fakes()
    # kernels.ddpm_step documents its op as differentiable; its "cpp" backend is this op,
    # so it gets the same gradients (w.r.t. z_t, eps_hat and noise).
    try:
        torch.library.register_autograd("dvpvae::ddpm_step", _step_backward,
                                        setup_context=_step_setup_context)
    except RuntimeError:  # already registered
        pass


def _finish(origin: str):
    global _ops, _origin
    _register_python_parts()
    _ops, _origin = _Ops(origin), origin
    return _ops


def cache_dir() -> str:
    """Directory for the JIT-built library (``DVPVAE_EXT_CACHE`` overrides)."""
    root = os.environ.get("DVPVAE_EXT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "dvpvae", "ext")
    tag = f"torch{torch.__version__}".replace("+", "_")
    return os.path.join(root, tag)


def build(verbose: bool = False):
    """JIT-compile the CPU extension with ``torch.utils.cpp_extension.load`` and load it.

    Rebuilds only when a source changed (ninja). Returns the ops wrapper; raises on a
    compiler error (unlike ``load()``, which never raises).
    """
    global _tried, _error
    from torch.utils.cpp_extension import load as cpp_load

    with _lock:
        if _ops is not None:
            return _ops
        build_dir = cache_dir()
        os.makedirs(build_dir, exist_ok=True)
        path = cpp_load(
            name="dvpvae_C", sources=[os.path.join(_CSRC, s) for s in _SOURCES],
            extra_include_paths=[_CSRC], extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"], build_directory=build_dir, verbose=verbose,
            is_python_module=False)
        torch.ops.load_library(path if isinstance(path, str) else
                               os.path.join(build_dir, "dvpvae_C.so"))
        _tried, _error = True, None
        return _finish("jit")


def load():
    """Return the extension ops (an object with the functions above), or None."""
    global _tried, _error
    if _tried:
        return _ops
    with _lock:
        if _tried:
            return _ops
        _tried = True
        try:
            importlib.import_module("dvpvae._C")
            return _finish("prebuilt")
        except ImportError as e:
            _error = f"dvpvae._C is not built ({e})"
        except OSError as e:  # built against another torch, missing symbols, ...
            _error = f"dvpvae._C failed to load ({e})"
    if os.environ.get("DVPVAE_JIT_BUILD", "0") == "1":
        try:
            return build()
        except Exception as e:  # a missing compiler must not break `import dvpvae`
            _error = f"JIT build failed: {e}"
    return None


def available() -> bool:
    return load() is not None


def origin() -> str | None:
    """"prebuilt", "jit" or None."""
    load()
    return _origin


def missing_reason() -> str:
    """Why the extension is unavailable and how to get it (for error messages and skips)."""
    return ((_error or "dvpvae._C is not built") +
            "; build it with `pip install --no-build-isolation -e .` (unset "
            "DVPVAE_SKIP_EXT_BUILD), or JIT-build with dvpvae._ext.build() / DVPVAE_JIT_BUILD=1")
