"""Closing 1x1 convolution of a ResBlock with the residual combine fused in:
out = skip + gate * (conv1x1(h) + bias).

The forward shares conv1x1_act's tile loop; its epilogue adds bias, scales by gate and adds
the skip tile, so the branch output never reaches memory. gate (a float or a 1-element
tensor) reaches the kernel as a 1-element device tensor: no host sync, exact in fp64.

Backward saves only h and W: grad_skip = grad_out, grad_h = gate * W^T @ grad_out, and the
deterministic sums A = sum grad_out @ h^T, s = sum grad_out over N*H*W (conv1x1_act's
backward kernels without activation) give grad_W = gate * A, grad_bias = gate * s and
grad_gate = <W, A> + <bias, s>, since sum(grad_out * (W h + b)) regroups into those sums.

Triton path: float32/float64, any N, C, H, W (tiles are masked).

Op: dvpvae_kernels::conv1x1_residual (torch.library.triton_op); its backward calls
conv1x1_act's ops conv1x1_input_grad and conv1x1_weight_grad.
"""
from __future__ import annotations

import torch

from ._conv1x1_common import check_conv_args, check_triton_dtype, matmul_blocks
from ._triton import kernel_op, launch, require_triton, tl, triton
from .conv1x1_act import (conv1x1_input_grad_op, conv1x1_weight_grad_op, input_grad,
                          weight_grad_sums)


def _check_residual_args(h, weight, bias, skip, gate) -> None:
    check_conv_args(h, weight, bias, x_name="h")
    want = (h.shape[0], weight.shape[0], h.shape[2], h.shape[3])
    if not isinstance(skip, torch.Tensor) or tuple(skip.shape) != want:
        raise ValueError(f"skip must have the output shape {want}, got "
                         f"{tuple(skip.shape) if isinstance(skip, torch.Tensor) else skip!r}")
    if skip.dtype != h.dtype or skip.device != h.device:
        raise ValueError(f"skip must match h's dtype/device {h.dtype}/{h.device}, "
                         f"got {skip.dtype}/{skip.device}")
    if isinstance(gate, torch.Tensor):
        if gate.numel() != 1:
            raise ValueError(f"gate must be a float or a 1-element tensor, got shape "
                             f"{tuple(gate.shape)}")
        if gate.device != h.device:
            raise ValueError(f"gate is on {gate.device} but h is on {h.device}")
    elif isinstance(gate, bool) or not isinstance(gate, (int, float)):
        raise ValueError(f"gate must be a float or a 1-element tensor, got {gate!r}")


# ----------------------------------------------------------------------------- reference

def conv1x1_residual_ref(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         skip: torch.Tensor, gate) -> torch.Tensor:
    """Plain-PyTorch skip + gate * conv2d(h, weight, bias) with a (out, in, 1, 1) weight."""
    _check_residual_args(h, weight, bias, skip, gate)
    if isinstance(gate, torch.Tensor):
        gate = gate.reshape(()).to(h.dtype)
    return skip + gate * torch.nn.functional.conv2d(h, weight, bias)


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from .conv1x1_act import conv1x1_tile

    @triton.jit
    def _conv1x1_residual_fwd_kernel(h_ptr, w_ptr, b_ptr, skip_ptr, gate_ptr, out_ptr,
                                     CIN, COUT, W, P,
                                     shn, shc, shh, shw, swo, swi, sb,
                                     ssn, ssc, ssh, ssw,
                                     HAS_BIAS: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_co = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        rco = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
        rp = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
        mco = rco < COUT
        mp = rp < P
        acc = conv1x1_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=out_ptr.dtype.element_ty),
                           h_ptr, w_ptr, b_ptr, n, rco, rp, mco, mp, CIN, W,
                           shn, shc, shh, shw, swo, swi, sb, HAS_BIAS, BLOCK_K)
        hh = (rp // W).to(tl.int64)
        ww = (rp % W).to(tl.int64)
        m2 = mco[:, None] & mp[None, :]
        s = tl.load(skip_ptr + n * ssn + rco[:, None].to(tl.int64) * ssc
                    + (hh * ssh + ww * ssw)[None, :], mask=m2, other=0.0)
        g = tl.load(gate_ptr)
        tl.store(out_ptr + n * COUT * P + rco[:, None].to(tl.int64) * P + rp[None, :],
                 s + g * acc, mask=m2)


# ----------------------------------------------------------------------------- launchers

def _gate_tensor(gate, like: torch.Tensor) -> torch.Tensor:
    """gate as a 1-element tensor in ``like``'s dtype on its device (differentiable view)."""
    if isinstance(gate, torch.Tensor):
        return gate.reshape(1).to(like.dtype)
    return torch.full((1,), float(gate), dtype=like.dtype, device=like.device)


def conv1x1_residual_fwd(h, weight, bias, skip, gate, blocks=None) -> torch.Tensor:
    """Launch the forward kernel. ``gate``: float or 1-element tensor.

    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) overrides the tile choice.
    """
    _check_residual_args(h, weight, bias, skip, gate)
    check_triton_dtype(h)
    gate_t = _gate_tensor(gate, h)
    n, cin, hh, ww = h.shape
    cout = weight.shape[0]
    p = hh * ww
    out = torch.empty((n, cout, hh, ww), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    bm, bn, bk = blocks or matmul_blocks(cout, p, cin)
    launch(_conv1x1_residual_fwd_kernel, (triton.cdiv(p, bn), triton.cdiv(cout, bm), n),
        h, weight, bias if bias is not None else weight, skip, gate_t, out,
        cin, cout, ww, p, *h.stride(), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, *skip.stride(),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out


def conv1x1_residual_bwd(grad_out, h, weight, bias, gate_t, need_h=True, need_w=True,
                         need_b=True, need_gate=False, blocks=None):
    """Returns (grad_h, grad_weight, grad_bias, grad_gate); entries not needed are None.

    ``gate_t`` is the 1-element gate tensor used in the forward; grad_gate has its shape.
    """
    n, cin, hh, ww = h.shape
    cout = weight.shape[0]
    if tuple(grad_out.shape) != (n, cout, hh, ww):
        raise ValueError(f"grad_out shape {tuple(grad_out.shape)} != {(n, cout, hh, ww)}")
    if grad_out.dtype != h.dtype or grad_out.device != h.device:
        raise ValueError("grad_out must match h's dtype and device")
    gh = gw = gb = gg = None
    if need_h:
        # grad_h = gate * W^T @ grad_out: the input gradient of a 1x1 conv without
        # activation, scaled by the gate in the same kernel's epilogue.
        gh = input_grad(grad_out, weight, grad_out, 0, h.shape, scale=gate_t, blocks=blocks)
    if need_w or need_b or need_gate:
        # The unscaled reductions A = sum grad_out @ h^T and s = sum grad_out are exactly the
        # weight/bias gradients of a 1x1 conv without activation: reuse that kernel.
        a, s = weight_grad_sums(grad_out, h, grad_out, 0, True, blocks)
        if need_w:
            gw = (gate_t * a).view(cout, cin, 1, 1)
        if need_b:
            gb = gate_t * s
        if need_gate:
            gg = (weight.view(cout, cin) * a).sum().reshape(1)
            if bias is not None:
                gg = gg + (bias * s).sum()
    return gh, gw, gb, gg


# ----------------------------------------------------------------------------- ops

@kernel_op("conv1x1_residual")
def conv1x1_residual_op(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """skip + gate * (conv1x1(h) + bias) with ``gate`` a 1-element tensor of h's dtype."""
    return conv1x1_residual_fwd(h, weight, bias, skip, gate)


def _conv1x1_residual_setup(ctx, inputs, output):
    h, weight, bias, _, gate = inputs
    ctx.save_for_backward(h, weight, bias, gate)


def _conv1x1_residual_backward(ctx, grad_out):
    # The same formulas as conv1x1_residual_bwd, through the ops.
    h, weight, bias, gate = ctx.saved_tensors
    need_h, need_w, need_b, need_skip, need_gate = ctx.needs_input_grad
    need_b = need_b and bias is not None
    gh = gw = gb = gg = None
    if need_h:
        gh = conv1x1_input_grad_op(grad_out, weight, None, gate, "none")
    if need_w or need_b or need_gate:
        a, s = conv1x1_weight_grad_op(grad_out, h, None, "none", True)
        if need_w:
            gw = (gate * a).view(weight.shape)
        if need_b:
            gb = gate * s
        if need_gate:
            gg = (weight.view(a.shape) * a).sum().reshape(1)
            if bias is not None:
                gg = gg + (bias * s).sum()
    return gh, gw, gb, (grad_out if need_skip else None), gg


conv1x1_residual_op.register_autograd(_conv1x1_residual_backward,
                                      setup_context=_conv1x1_residual_setup)


# ----------------------------------------------------------------------------- public

def conv1x1_residual(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     skip: torch.Tensor, gate=1.0) -> torch.Tensor:
    """skip + gate * (conv1x1(h) + bias) with the Triton kernels: h (N,Cin,H,W), weight
    (Cout,Cin,1,1), bias (Cout,) or None, skip (N,Cout,H,W); gate a float or a
    0-dim/1-element tensor (differentiable)."""
    require_triton("conv1x1_residual", h.device)
    _check_residual_args(h, weight, bias, skip, gate)
    return conv1x1_residual_op(h, weight, bias, skip, _gate_tensor(gate, h))
