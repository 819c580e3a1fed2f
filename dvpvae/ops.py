"""Op providers: where the model's operations come from.

Every block calls its operations through a provider passed down from the model, so one set
of modules serves every implementation:

* ``reference``: plain PyTorch, the oracle every other provider is tested against;
* ``cpu``: channels-last convolutions with split gradients (``dvpvae.cpu_conv``), exact
  cheaper forms of three layers (``dvpvae.fast_layers``), the C++ prior sampler and the
  native UNet forward of the no-gradient diffusion bounds;
* ``triton``: the fused kernels of ``dvpvae.kernels`` (CUDA tensors, or CPU tensors in the
  Triton interpreter) with the same layer forms.

``get_ops(name)`` is the one place that turns a name into a provider.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dvpvae import fast_layers
from dvpvae.cpu_conv import channels_last, conv_cl
from dvpvae.cuda_graphs import sample_prior_loop, triton_unsupported_reason
from dvpvae.kernels.conv1x1_act import apply_activation, conv1x1_act
from dvpvae.kernels.conv1x1_residual import conv1x1_residual
from dvpvae.kernels.dct_pseudoinput import (dct_pseudoinput, dct_pseudoinput_ref, idct_pseudoinput,
                                            idct_pseudoinput_ref)
from dvpvae.kernels.ddpm_step import ddpm_step, ddpm_step_ref
from dvpvae.kernels.reparam_kl import reparam_kl, reparam_kl_ref, reparam_sample, reparam_sample_ref
from dvpvae.native_prior import native_unsupported_reason, sample_native, unet_eps_native_or_module

PROVIDERS = ("reference", "cpu", "triton")


class ReferenceOps:
    """Plain PyTorch, in the order the research code computes."""

    name = "reference"

    # ------------------------------------------------------------ layout and activations
    def block_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The memory layout the ResNet blocks work in."""
        return x

    def activate(self, x: torch.Tensor, activation: str) -> torch.Tensor:
        return apply_activation(x, activation)

    # ------------------------------------------------------------ convolutions
    def conv(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        return conv(x)

    def conv_act(self, x: torch.Tensor, conv: nn.Conv2d, activation: str) -> torch.Tensor:
        """activation(conv(x))."""
        return apply_activation(self.conv(x, conv), activation)

    def conv_residual(self, h: torch.Tensor, conv: nn.Conv2d, skip: torch.Tensor,
                      gate: torch.Tensor) -> torch.Tensor:
        """skip + gate * conv(h): the end of a ResBlock."""
        return skip + gate * self.conv(h, conv)

    def stem(self, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """The encoder's input convolution, in the blocks' layout."""
        return conv(x)

    def project(self, z: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """A ladder latent's 1x1 projection to the decoder's channels."""
        return conv(z)

    def head(self, a: torch.Tensor, pointwise: nn.Conv2d, conv3x3: nn.Conv2d) -> torch.Tensor:
        """The decoder's output head conv3x3(pointwise(a))."""
        return conv3x3(pointwise(a))

    def upsample(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Bilinear resize to (size, size), align_corners=False."""
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    # ------------------------------------------------------------ pseudoinputs and latents
    dct = staticmethod(dct_pseudoinput_ref)  # image -> normalised DCT pseudoinput
    idct = staticmethod(idct_pseudoinput_ref)  # pseudoinput -> image
    reparam_kl = staticmethod(reparam_kl_ref)  # clamped z ~ q and per-example KL(q || p)
    reparam_sample = staticmethod(reparam_sample_ref)  # z ~ p, variance scaled by a temperature

    # ------------------------------------------------------------ diffusion prior
    def unet_eps(self, unet, z, t):
        """The prior's noise prediction ``unet(z, t)`` without dropout masks (the diffusion
        bound and the NLL's trajectory)."""
        return unet(z, t)

    ddpm_step = staticmethod(ddpm_step_ref)  # one ancestral step of the prior

    def sample_prior(self, prior, n: int, temperature: float, noise, steps: int | None = None) -> torch.Tensor:
        """n draws of u from the prior by ancestral sampling through ``steps`` steps (default
        its T; ``DiffusionPrior.step_table``)."""
        z, eps = prior.sampling_noise(n, noise, steps)
        return prior.sample_loop(z, eps, temperature, self)


class _FastLayers(ReferenceOps):
    """Exact cheaper forms of the z projection, upsampling and output head."""

    def project(self, z, conv):
        return fast_layers.pointwise_conv(z, conv)

    def head(self, a, pointwise, conv3x3):
        return fast_layers.composed_head(a, pointwise, conv3x3)

    def upsample(self, x, size):
        return fast_layers.upsample_bilinear(x, size)


class CpuOps(_FastLayers):
    """Channels-last convolutions whose weight and bias gradients come from the extension
    (``extension=True``, where its kernel covers the shape) or oneDNN, and the native C++
    UNet (the prior sampler, and the no-gradient UNet calls) where it serves the prior."""

    name = "cpu"

    def __init__(self, extension: bool = True):
        self.extension = extension

    def block_layout(self, x):
        return channels_last(x)

    def conv(self, x, conv):
        return conv_cl(x, conv.weight, conv.bias, self.extension)

    def stem(self, x, conv):
        return self.block_layout(fast_layers.pointwise_conv(x, conv))

    def unet_eps(self, unet, z, t):
        # The native forward has no autograd: with gradients, the module. It computes in float32
        # under bf16 autocast as well (precision="bf16"), which is faster there and more exact.
        if not self.extension or torch.is_grad_enabled():
            return unet(z, t)
        return unet_eps_native_or_module(unet, z, t)

    def sample_prior(self, prior, n, temperature, noise, steps=None):
        if not self.extension or native_unsupported_reason(prior) is not None:
            return super().sample_prior(prior, n, temperature, noise, steps)
        z, eps = prior.sampling_noise(n, noise, steps)
        return sample_native(prior, z, eps, temperature)


class TritonOps(_FastLayers):
    """The fused Triton kernels: 1x1 convolutions with their epilogues, DCT pseudoinputs,
    reparameterization with KL, and the DDPM step."""

    name = "triton"

    def conv(self, x, conv):
        if conv.kernel_size == (1, 1):
            return conv1x1_act(x, conv.weight, conv.bias, "none")
        return conv(x)

    def conv_act(self, x, conv, activation):
        if conv.kernel_size == (1, 1):
            return conv1x1_act(x, conv.weight, conv.bias, activation)
        return apply_activation(conv(x), activation)

    def conv_residual(self, h, conv, skip, gate):
        return conv1x1_residual(h, conv.weight, conv.bias, skip, gate)

    dct = staticmethod(dct_pseudoinput)
    idct = staticmethod(idct_pseudoinput)
    reparam_kl = staticmethod(reparam_kl)
    reparam_sample = staticmethod(reparam_sample)
    ddpm_step = staticmethod(ddpm_step)

    def sample_prior(self, prior, n, temperature, noise, steps=None):
        # One loop on every device: captured once per (batch size, steps) and replayed on
        # CUDA, eager elsewhere (dvpvae.cuda_graphs.PriorLoop).
        z, eps = prior.sampling_noise(n, noise, steps)
        return sample_prior_loop(prior, z, eps, temperature, self)


class Bf16Ops:
    """``base`` with its convolutions and matmuls in bfloat16, for passes that run under
    ``torch.autocast(..., dtype=torch.bfloat16)`` (``FastDVPVAE(precision="bf16")``).

    Autocast computes the convolutions and matmuls in bfloat16 from float32 master weights;
    this provider keeps the rest in float32: each block's output and its upsampling (the
    residual stream, which feeds the latents' parameters, so the KL and every log-density),
    the likelihood's parameters, and the DCT pseudoinput transforms (u, whose density is the
    diffusion bound). The diffusion bound's error term is float32 as well: the UNet's
    prediction (bfloat16 from the module, float32 from the cpu provider's native forward in
    the no-gradient passes) is subtracted from float32 noise.
    """

    def __init__(self, base: ReferenceOps):
        if isinstance(base, TritonOps):
            raise ValueError("the triton provider's fused kernels are float32 only; use precision='bf16' "
                             "with ops='reference' (compiled, inductor generates bfloat16 kernels) or 'cpu'")
        self.base = base
        self.name = f"{base.name}+bf16"

    def __getattr__(self, attr):
        return getattr(self.base, attr)

    def conv_residual(self, h, conv, skip, gate):
        return self.base.conv_residual(h, conv, skip, gate).float()

    def stem(self, x, conv):
        return self.base.stem(x, conv).float()

    def project(self, z, conv):
        return self.base.project(z, conv).float()

    def head(self, a, pointwise, conv3x3):
        return self.base.head(a, pointwise, conv3x3).float()

    def upsample(self, x, size):
        with torch.autocast(x.device.type, enabled=False):
            return self.base.upsample(x.float(), size)

    def dct(self, x, *args):
        with torch.autocast(x.device.type, enabled=False):
            return self.base.dct(x, *args)

    def idct(self, u, *args):
        with torch.autocast(u.device.type, enabled=False):
            return self.base.idct(u, *args)


REFERENCE = ReferenceOps()


def get_ops(name: str | ReferenceOps, extension: bool = True) -> ReferenceOps:
    """The provider called ``name`` (a provider instance is returned as it is)."""
    if isinstance(name, ReferenceOps):
        return name
    if name == "reference":
        return REFERENCE
    if name == "cpu":
        return CpuOps(extension)
    if name == "triton":
        return TritonOps()
    raise ValueError(f"unknown op provider {name!r}; choose from {PROVIDERS}")


def best_ops(device: torch.device, fused_kernels: bool = True, extension: bool = True) -> ReferenceOps:
    """The fastest provider for tensors on ``device``: triton on CUDA (when the kernels run
    on that GPU), cpu on the CPU, reference for anything else or with ``fused_kernels=False``.

    On CUDA a missing triton package, a GPU older than Triton supports or a failing probe
    launch (``dvpvae.cuda_graphs.triton_unsupported_reason``) gives the reference provider
    with one warning naming the cause, instead of an error at the first kernel launch."""
    if not fused_kernels:
        return REFERENCE
    if device.type == "cuda":
        reason = triton_unsupported_reason(device)
        if reason is None:
            return TritonOps()
        warnings.warn(f"the fused kernels cannot run on {device}: {reason}; computing with the "
                      "reference provider", RuntimeWarning, stacklevel=2)
        return REFERENCE
    if device.type == "cpu":
        return CpuOps(extension)
    return REFERENCE
