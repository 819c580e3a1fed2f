"""Ancestral sampling of the diffusion prior p(u) (MODEL.md section 5), fast and reference.

Backends:
  * ``reference``: the Python loop over ``DiffusionPrior.step`` (T UNet calls, each followed
    by the elementwise update); always available, the baseline of tests and benchmarks.
  * ``extension``: the whole T-step loop in C++, no return to Python between steps. Two
    forms of the UNet inside it:
      - native (``torch.ops.dvpvae.ddpm_sample_unet``, csrc/unet_cpu.cpp): a hand-written
        float32 CPU forward of ``dvpvae.unet.UNet``. Used whenever ``native_supported``
        holds: CPU, float32, the UNet is exactly ``dvpvae.unet.UNet`` with its parameter
        layout and GroupNorms, and ``DVPVAE_PRIOR_NATIVE`` is not ``0``. Needs no compile.
        ~4-6x faster than the AOTInductor form on the paper's priors (its tiny convolutions
        were dominated by oneDNN's per-call set-up).
      - AOTInductor (``torch.ops.dvpvae.ddpm_sample``, csrc/ddpm_cpu.cpp): the UNet as an
        AOTInductor package called from C++; the fallback for everything else (float64,
        CUDA, other UNet classes).
    Both take the weights as inputs on every call, so a training run never samples stale
    weights.

The AOTInductor package (compile_package):
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
  * ``auto`` (default): the extension when it is built *and* needs no compile (the native
    forward serves the prior, or its package is already compiled in this process or on
    disk); otherwise the reference loop. A first call therefore never stalls for a
    compile; call ``compile_prior(prior)`` once (or pass ``backend="extension"``) to opt in.
  * ``1``: compile on first use.  ``0``: always the reference loop.
The reference loop is also used when the UNet is in training mode with active dropout
(both C++ forms run the UNet in eval mode) or when the prior lives on an unsupported device.
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
from dvpvae.unet import GROUPS, UNet

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


def compile_package(prior, force: bool = False) -> str:
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


def compile_prior(prior, force: bool = False) -> str | None:
    """Make the extension backend ready for ``prior``: nothing to do when the native forward
    serves it (returns None), else the AOTInductor package's path (``compile_package``)."""
    if native_supported(prior):
        return None
    return compile_package(prior, force)


def _ready_package(prior) -> str | None:
    path = package_path(prior)
    return path if path in _compiled or os.path.exists(path) else None


# --------------------------------------------------------------------------- native
_BLOCK = ("norm_in.weight", "norm_in.bias", "conv_in.weight", "conv_in.bias", "film.weight", "film.bias",
          "norm_out.weight", "norm_out.bias", "conv_out.weight", "conv_out.bias")


@functools.lru_cache(maxsize=None)
def _native_names(num_res_blocks: int) -> tuple[str, ...]:
    """UNet.named_parameters() names in the order csrc/unet_cpu.cpp reads the weights."""
    names = ["time_embed.0.weight", "time_embed.0.bias", "time_embed.2.weight", "time_embed.2.bias",
             "input_conv.weight", "input_conv.bias"]
    names += [f"down.{i}.{k}" for i in range(num_res_blocks) for k in _BLOCK]
    names += [f"mid1.{k}" for k in _BLOCK]
    names += [f"mid_attn.{k}" for k in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias",
                                        "proj.weight", "proj.bias")]
    names += [f"mid2.{k}" for k in _BLOCK]
    names += [f"up.{i}.{k}" for i in range(num_res_blocks + 1) for k in _BLOCK + ("skip.weight", "skip.bias")]
    names += ["out_norm.weight", "out_norm.bias", "out_conv.weight", "out_conv.bias"]
    return tuple(names)


def _native_inputs(prior) -> tuple[list[torch.Tensor], float] | None:
    """(weights, GroupNorm eps) for ``ddpm_sample_unet``, or None when the native forward
    does not serve ``prior``: it must be exactly ``dvpvae.unet.UNet`` (a subclass may change
    ``forward``) with float32 weights and table on the CPU, the parameter layout
    csrc/unet_cpu.cpp reads, GROUPS-group GroupNorms sharing one eps, and the build must
    have the op (an older prebuilt library may not). One pass: it runs on every call."""
    if os.environ.get("DVPVAE_PRIOR_NATIVE", "1") == "0":
        return None
    unet = prior.unet
    if (type(unet) is not UNet or prior.coefficients.device.type != "cpu" or not _ext.available()
            or not torch._C._dispatch_has_kernel_for_dispatch_key("dvpvae::ddpm_sample_unet", "CPU")):
        return None
    named = _weights(unet)
    if (tuple(k for k, _ in named) != _native_names(len(unet.down))
            or any(v.dtype != torch.float32 or v.device.type != "cpu" for _, v in named)):
        return None
    blocks = [*unet.down, unet.mid1, unet.mid2, *unet.up]
    norms = [n for b in blocks for n in (b.norm_in, b.norm_out)] + [unet.mid_attn.norm, unet.out_norm]
    eps = {n.eps for n in norms}
    if len(eps) != 1 or any(n.num_groups != GROUPS for n in norms):
        return None
    # Sampling runs under no_grad, so the parameters go in as they are (no detach calls).
    return [v if v.is_contiguous() else v.contiguous() for _, v in named], eps.pop()


def native_supported(prior) -> bool:
    """Whether the native C++ forward serves ``prior`` (see ``_native_inputs``)."""
    return _native_inputs(prior) is not None


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
    if policy == "1" or native_supported(prior) or _ready_package(prior) is not None:
        return "extension"
    return "reference"


@torch.no_grad()
def sample_prior_native(prior, n: int, temperature: float = 1.0, noise=None) -> torch.Tensor:
    """The extension's loop with the native UNet forward; ``native_supported(prior)`` must hold."""
    inputs = _native_inputs(prior)
    if inputs is None:
        raise RuntimeError("the native UNet forward does not support this prior (see "
                           "dvpvae.sampling.native_supported); use sample_prior_aoti")
    return _run_native(prior, n, temperature, noise, inputs)


def _run_native(prior, n: int, temperature: float, noise, inputs) -> torch.Tensor:
    z, eps = _draw(prior, n, noise)
    weights, gn_eps = inputs
    return _ext.load().ddpm_sample_unet(z.contiguous(), eps.contiguous(), prior.coefficients.contiguous(),
                                        weights, len(prior.unet.down), GROUPS, gn_eps, float(temperature))


@torch.no_grad()
def sample_prior_aoti(prior, n: int, temperature: float = 1.0, noise=None) -> torch.Tensor:
    """The extension's loop over the AOTInductor package (compiled on first use)."""
    z, eps = _draw(prior, n, noise)
    path = compile_package(prior)
    weights = [v.detach().contiguous() for _, v in _weights(prior.unet)]
    return _ext.load().ddpm_sample(z.contiguous(), eps.contiguous(), prior.coefficients.contiguous(),
                                   weights, path, float(temperature))


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
    inputs = _native_inputs(prior)
    if inputs is not None:
        return _run_native(prior, n, temperature, noise, inputs)
    return sample_prior_aoti(prior, n, temperature, noise)


if __name__ == "__main__":  # pragma: no cover - convenience: precompile the presets' AOTI packages
    from dvpvae.config import get_config
    from dvpvae.diffusion import DiffusionPrior

    for preset in sys.argv[1:] or ["mnist", "omniglot", "cifar10"]:
        print(preset, compile_package(DiffusionPrior.from_config(get_config(preset))))
