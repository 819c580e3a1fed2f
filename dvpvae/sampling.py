"""Ancestral sampling of the diffusion prior p(u) (MODEL.md section 5), fast and reference.

Backends:
  * ``reference``: the Python loop over ``DiffusionPrior.step`` (T UNet calls, each followed
    by the elementwise update); always available, the baseline of tests and benchmarks.
  * ``extension``: ``torch.ops.dvpvae.ddpm_sample`` (csrc/ddpm_cpu.cpp), which runs the
    whole T-step loop in C++: the UNet is an AOTInductor package called from C++, the
    update is the fused C++ step. No return to Python between steps.

The AOTInductor package (compile_prior):
  * is exported from ``functional_call(unet, weights, (z_t, t))`` with the weights as
    *inputs*, so it depends only on the architecture. Training changes the weights every
    step; a package with frozen weights would need a ~30 s recompile (or a constant-buffer
    swap) whenever they change, and a stale package would sample from old weights without
    any error. Passing them as inputs costs nothing measurable here (freezing gave the same
    speed on this CPU: the 3x3 convolutions are ATen calls either way).
  * has a dynamic batch dimension (1 <= N), so one compile serves every sample count.
  * is cached on disk under ``DVPVAE_CACHE_DIR`` (default ``~/.cache/dvpvae/aoti``) in a
    file named by a hash of: torch version, the UNet class and the source of its module,
    every weight's name/shape/dtype, the sample shape and the device type. A changed
    architecture or UNet source gets a new file; unchanged ones reuse the compile (paid
    once per machine, ~35 s on 2 cores for the MNIST prior).

Automatic choice (``backend=None``), controlled by ``DVPVAE_PRIOR_COMPILE``:
  * ``auto`` (default): the extension when it is built *and* the prior's package is
    already compiled (in this process or on disk); otherwise the reference loop. A first
    call therefore never stalls for a compile; call ``compile_prior(prior)`` once (or pass
    ``backend="extension"``) to opt in.
  * ``1``: compile on first use.  ``0``: always the reference loop.
The reference loop is also used when the UNet is in training mode with active dropout
(the package is exported in eval mode) or when the prior lives on an unsupported device.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import sys
import tempfile
import threading

import torch
from torch import nn

from dvpvae import _ext
from dvpvae.noise import Noise, as_noise

BACKENDS = ("reference", "extension")
_FORMAT = 1  # bump when the export recipe changes: old packages are then ignored

_lock = threading.Lock()
_compiled: set[str] = set()  # package paths built or found by this process


# --------------------------------------------------------------------------- reference
@torch.no_grad()
def sample_prior_ref(prior, n: int, temperature: float = 1.0, noise=None) -> torch.Tensor:
    """The Python loop: z_1 ~ N(0, I), then T calls of ``prior.step`` (row T-1 first)."""
    z, eps = _draw(prior, n, noise)
    for k, i in enumerate(range(prior.T - 1, -1, -1)):
        z = prior.step(z, i, eps[k], temperature)
    return z


def _draw(prior, n: int, noise):
    # Same names, shapes and order as DiffusionPrior.sample, so a seeded RNG gives the same
    # draws whichever backend runs.
    if n < 1:
        raise ValueError(f"number of samples must be positive, got {n}")
    noise = as_noise(noise)
    like = prior.coefficients
    z = noise.normal("prior_zT", (n,) + tuple(prior.shape), like)
    eps = noise.normal("prior_eps", (prior.T, n) + tuple(prior.shape), like)
    return z, eps


# --------------------------------------------------------------------------- packages
def cache_dir() -> str:
    return os.environ.get("DVPVAE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "dvpvae", "aoti")


def _weights(unet: nn.Module) -> list[tuple[str, torch.Tensor]]:
    # Fixed order (parameters, then buffers): the package's inputs follow it.
    return list(unet.named_parameters()) + list(unet.named_buffers())


@functools.lru_cache(maxsize=None)
def _source_hash(cls: type) -> str:
    # The forward depends on module-level helpers too (timestep_embedding, ...), so hash
    # the whole source file of the class's module (once per process: edits to the source
    # take effect on the next import anyway).
    try:
        path = inspect.getsourcefile(cls)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except (TypeError, OSError):
        return cls.__qualname__


def package_key(prior) -> str:
    """Hash naming the package of ``prior``'s UNet (architecture only, not weight values)."""
    unet = prior.unet
    desc = {
        "format": _FORMAT,
        "torch": torch.__version__,
        "class": f"{type(unet).__module__}.{type(unet).__qualname__}",
        "source": _source_hash(type(unet)),
        "weights": [(k, list(v.shape), str(v.dtype)) for k, v in _weights(unet)],
        "sample_shape": list(prior.shape),
        "dtype": str(prior.coefficients.dtype),
        "device": prior.coefficients.device.type,
        "dynamic_batch": True,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def package_path(prior) -> str:
    return os.path.join(cache_dir(), f"prior_unet_{package_key(prior)}.pt2")


class _FunctionalUNet(nn.Module):
    """eps_hat = unet(z_t, t) with the weights passed as positional inputs."""

    def __init__(self, unet: nn.Module, names: list[str]):
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, z_t, t, *weights):
        return torch.func.functional_call(self.unet, dict(zip(self.names, weights)), (z_t, t))


def compile_prior(prior, force: bool = False) -> str:
    """Export + AOTInductor-compile ``prior.unet``; return the package path (cached on disk)."""
    path = package_path(prior)
    with _lock:
        if not force and (path in _compiled or os.path.exists(path)):
            _compiled.add(path)
            return path
        named = _weights(prior.unet)
        names = [k for k, _ in named]
        weights = [v.detach() for _, v in named]
        like = prior.coefficients
        # Batch 2 as the example: export would specialise a batch of 1.
        z = torch.zeros((2,) + tuple(prior.shape), dtype=like.dtype, device=like.device)
        t = torch.full((2,), 0.5, dtype=like.dtype, device=like.device)
        batch = torch.export.Dim("batch", min=1)
        was_training = prior.unet.training
        prior.unet.eval()  # dropout off: sampling is inference
        try:
            with torch.no_grad():
                ep = torch.export.export(
                    _FunctionalUNet(prior.unet, names), (z, t, *weights),
                    dynamic_shapes=({0: batch}, {0: batch}, tuple(None for _ in weights)))
        finally:
            prior.unet.train(was_training)
        os.makedirs(cache_dir(), exist_ok=True)
        # Compile to a temporary name and rename: another process (or engineer) sharing
        # the cache never sees a half-written package.
        fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=cache_dir())
        os.close(fd)
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _compiled.add(path)
        return path


def _ready_package(prior) -> str | None:
    path = package_path(prior)
    return path if path in _compiled or os.path.exists(path) else None


# --------------------------------------------------------------------------- dispatch
def _has_active_dropout(unet: nn.Module) -> bool:
    return unet.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in unet.modules())


def _device_supported(device: torch.device) -> bool:
    # A CPU-only build of the extension has no CUDA kernel even when torch has CUDA.
    if device.type not in ("cpu", "cuda"):
        return False
    key = "CPU" if device.type == "cpu" else "CUDA"
    return torch._C._dispatch_has_kernel_for_dispatch_key("dvpvae::ddpm_sample", key)


def resolve_backend(prior, backend: str | None = None) -> str:
    """The backend ``sample_prior`` would use for ``prior`` (see the module docstring)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "reference":
        return "reference"
    device = prior.coefficients.device
    if backend == "extension":
        if not _ext.available():
            raise RuntimeError("backend 'extension' needs the compiled extension: " + _ext.missing_reason())
        if not _device_supported(device):
            raise RuntimeError(f"backend 'extension' does not support {device.type} tensors")
        if _has_active_dropout(prior.unet):
            raise RuntimeError("backend 'extension' samples in eval mode; the UNet is in training "
                               "mode with dropout > 0 (call prior.eval() or use backend='reference')")
        return "extension"
    policy = os.environ.get("DVPVAE_PRIOR_COMPILE", "auto")
    if policy not in ("auto", "0", "1"):
        raise ValueError(f"DVPVAE_PRIOR_COMPILE must be auto, 0 or 1, got {policy!r}")
    if (policy == "0" or not _ext.available() or not _device_supported(device)
            or _has_active_dropout(prior.unet)):
        return "reference"
    if policy == "1" or _ready_package(prior) is not None:
        return "extension"
    return "reference"


@torch.no_grad()
def sample_prior(prior, n: int, temperature: float = 1.0, noise: Noise | dict | None = None,
                 backend: str | None = None) -> torch.Tensor:
    """Draw n pseudoinputs u ~ p(u) by ancestral sampling through the T steps.

    Args:
        prior: a ``DiffusionPrior`` (``unet``, ``T``, ``shape``, ``coefficients``, ``step``).
        n: number of samples (>= 1).
        temperature: multiplies the standard deviation of the per-step noise.
        noise: a ``Noise`` / dict with the draws ``prior_zT`` (n,C,c,c) and ``prior_eps``
            (T,n,C,c,c) (row 0 used at the first step t=1); missing draws are fresh.
        backend: None (automatic), "reference" or "extension".

    Returns:
        u of shape (n, C, c, c), dtype and device of the prior.
    """
    name = resolve_backend(prior, backend)
    if name == "reference":
        return sample_prior_ref(prior, n, temperature, noise)
    z, eps = _draw(prior, n, noise)
    path = compile_prior(prior)
    weights = [v.detach().contiguous() for _, v in _weights(prior.unet)]
    return _ext.load().ddpm_sample(z.contiguous(), eps.contiguous(), prior.coefficients.contiguous(),
                                   weights, path, float(temperature))


if __name__ == "__main__":  # pragma: no cover - convenience: precompile the presets' priors
    from dvpvae.config import get_config
    from dvpvae.diffusion import DiffusionPrior

    for preset in sys.argv[1:] or ["mnist", "omniglot", "cifar10"]:
        print(preset, compile_prior(DiffusionPrior.from_config(get_config(preset))))
