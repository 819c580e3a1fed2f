"""The native C++ forward of ``dvpvae.unet.UNet`` (csrc/unet_cpu.cpp, float32, CPU, no
autograd), in two ops: ``torch.ops.dvpvae.ddpm_sample_unet`` runs the prior's whole
ancestral loop (its T steps or any other number) without returning to Python between steps,
and ``torch.ops.dvpvae.unet_eps`` is one batched forward (the UNet calls of the diffusion
bound in evaluation and in the NLL's trajectory terms).

Python owns the UNet's layout: ``_weights`` lists the parameters in the order the ops read
them, and the FiLM values come from the UNet's own modules (``UNet.film_table``). The ops
read the weights passed on each call, so they always compute with the current ones. The
references are ``DiffusionPrior``'s Python loop over its steps and ``UNet.forward``.
"""
from __future__ import annotations

import torch
from torch import nn

from dvpvae import _ext
from dvpvae.unet import GROUPS, UNet


def _norms(unet: UNet) -> list[nn.Module]:
    return [n for b in unet.time_blocks() for n in (b.norm_in, b.norm_out)] + [unet.mid_attn.norm, unet.out_norm]


def _weights(unet: UNet) -> list[torch.Tensor]:
    """The op's weight list, (weight, bias) of each layer: input_conv; per time block in
    forward order norm_in, conv_in, norm_out, conv_out and skip when it is a convolution,
    with mid_attn's norm, qkv and proj between mid1 and mid2; out_norm, out_conv."""
    def wb(*layers):
        return [p for m in layers for p in (m.weight, m.bias)]

    out = wb(unet.input_conv)
    for b in unet.time_blocks():
        out += wb(b.norm_in, b.conv_in, b.norm_out, b.conv_out)
        if not isinstance(b.skip, nn.Identity):
            out += wb(b.skip)
        if b is unet.mid1:
            out += wb(unet.mid_attn.norm, unet.mid_attn.qkv, unet.mid_attn.proj)
    out += wb(unet.out_norm, unet.out_conv)
    return [w.contiguous() for w in out]


def _missing_ops_reason() -> str | None:
    if not _ext.available():
        return _ext.missing_reason()
    for op in ("ddpm_sample_unet", "unet_eps"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dvpvae::{op}", "CPU"):
            return f"the built dvpvae._C has no {op} op (rebuild the extension)"
    return None


# Fixed once the extension is loaded; a constant, so compiled graphs trace the checks below.
_MISSING_OPS = _missing_ops_reason()


def native_unet_unsupported_reason(unet, z: torch.Tensor | None = None) -> str | None:
    """Why the native forward cannot compute ``unet`` (on ``z``), or None when it can."""
    if _MISSING_OPS is not None:
        return _MISSING_OPS
    if type(unet) is not UNet:  # a subclass may change forward
        return f"the prior's UNet is a {type(unet).__qualname__}, the native forward is dvpvae.unet.UNet's"
    if z is not None and (z.device.type != "cpu" or z.dtype != torch.float32):
        return f"the native forward runs float32 on the CPU; its input is {z.dtype} on {z.device}"
    for name, p in unet.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return f"the native forward runs float32 on the CPU; unet.{name} is {p.dtype} on {p.device}"
    norms = _norms(unet)
    if not all(isinstance(n, nn.GroupNorm) and n.num_groups == GROUPS and n.affine for n in norms):
        return f"the native forward needs affine GroupNorms with {GROUPS} groups"
    if len({n.eps for n in norms}) != 1:
        return "the native forward needs one eps for all GroupNorms"
    if unet.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in unet.modules()):
        return "the native forward runs in eval mode; the UNet is in training mode with dropout > 0"
    return None


def native_unsupported_reason(prior) -> str | None:
    """Why the native loop cannot sample ``prior``, or None when it can."""
    coef = prior.coefficients
    if coef.device.type != "cpu" or coef.dtype != torch.float32:
        return f"the native loop runs float32 on the CPU; the coefficient table is {coef.dtype} on {coef.device}"
    return native_unet_unsupported_reason(prior.unet)


@torch.no_grad()
def sample_native(prior, z_T: torch.Tensor, eps: torch.Tensor, temperature: float) -> torch.Tensor:
    """Ancestral sampling through S steps from z_T (n, C, s, s) with the step noise eps
    (S, n, C, s, s), row k used at the k-th step (t = 1 first); S = T is the prior's own grid.
    Same numbers as the Python loop up to float32 round-off."""
    reason = native_unsupported_reason(prior)
    if reason is not None:
        raise RuntimeError(f"the native prior sampler does not serve this prior: {reason}")
    unet, S = prior.unet, eps.shape[0]
    # The step k = S-1-i runs the UNet at t = (i+1)/S, as DiffusionPrior.step forms it.
    t = torch.tensor([(i + 1) / S for i in range(S - 1, -1, -1)], dtype=torch.float32)
    films = unet.film_table(t).contiguous()
    return torch.ops.dvpvae.ddpm_sample_unet(
        z_T.contiguous(), eps.contiguous(), prior.step_table(S).contiguous(), films, _weights(unet),
        len(unet.down), GROUPS, unet.out_norm.eps, float(temperature))


def unet_eps_native(unet: UNet, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``unet(z, t)`` for z (N, C, s, s) and t (N,) by the native forward (no autograd; the
    UNet as in eval mode). Same numbers up to float32 round-off."""
    reason = native_unet_unsupported_reason(unet, z)
    if reason is not None:
        raise RuntimeError(f"the native UNet forward does not serve this UNet: {reason}")
    return _unet_eps(unet, z, t)


def unet_eps_native_or_module(unet: UNet, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``unet(z, t)``: by the native forward where it serves (``unet_eps_native``), else by
    the module."""
    return _unet_eps(unet, z, t) if native_unet_unsupported_reason(unet, z) is None else unet(z, t)


def _unet_eps(unet: UNet, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # The FiLM table too is float32, as the op reads it. Autocast is left only where it is on:
    # an autocast region in a compiled float32 graph would keep it out of AOTAutograd's cache.
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _unet_eps(unet, z, t)
    return torch.ops.dvpvae.unet_eps(z.contiguous(), unet.film_table(t.to(z.dtype)).contiguous(), _weights(unet),
                                     len(unet.down), GROUPS, unet.out_norm.eps)
