"""1x1 convolution with fused bias and activation: y = act(conv1x1(x) + bias).

Per image the op is W (Cout x Cin) @ X (Cin x H*W). The kernels read NCHW (or any strides)
directly and write contiguous NCHW; a program computes one (out-channel x pixel) tile with
tl.dot in IEEE precision (TF32 would lose about three digits).

Backward: the forward saves the pre-activation z (silu and gelu cannot be inverted from y,
and recomputing z costs a second pass over x and W); act'(z) is applied inside both
gradient kernels, so grad_z never reaches memory. grad_W and grad_bias are per-split
partial sums reduced by torch: deterministic, no atomics.

Ops (torch.library.triton_op, autograd registered, traceable by torch.compile):
dvpvae_kernels::conv1x1_act -> (y, z), and the backward ops conv1x1_input_grad and
conv1x1_weight_grad, which conv1x1_residual's backward shares.

Triton path: float32/float64, any N, C, H, W (tiles are masked). Activations use only
tl.* functions, which the interpreter also provides.
"""
from __future__ import annotations

import torch

from ._conv1x1_common import check_conv_args, check_triton_dtype, matmul_blocks, reduction_split
from ._triton import kernel_op, launch, require_triton, tl, triton

# Activations of the model, "none" = identity; gelu is the exact erf form (nn.GELU()).
# The index of a name is the kernels' ACT code.
ACTIVATIONS = ("none", "relu", "silu", "elu", "gelu")


def _check_activation(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)


# ----------------------------------------------------------------------------- reference

def conv1x1_act_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str = "silu") -> torch.Tensor:
    """Plain-PyTorch y = act(conv2d(x, weight, bias)) with a (out, in, 1, 1) weight."""
    check_conv_args(x, weight, bias)
    _check_activation(activation)
    return apply_activation(torch.nn.functional.conv2d(x, weight, bias), activation)


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """The named activation (one of ``ACTIVATIONS``) in functional PyTorch."""
    if activation == "relu":
        return torch.relu(z)
    if activation == "silu":
        return torch.nn.functional.silu(z)
    if activation == "elu":
        return torch.nn.functional.elu(z)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)  # approximate="none": the exact erf form
    if activation == "none":
        return z
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _act_fwd(z, ACT: tl.constexpr):
        if ACT == 1:
            z = tl.maximum(z, 0.0)
        elif ACT == 2:
            z = z * tl.sigmoid(z)
        elif ACT == 3:
            z = tl.where(z > 0.0, z, tl.exp(z) - 1.0)
        elif ACT == 4:
            z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z

    @triton.jit
    def _act_grad(z, ACT: tl.constexpr):
        """d act / d z evaluated at the saved pre-activation z."""
        if ACT == 1:
            d = tl.where(z > 0.0, 1.0, 0.0)  # torch's relu backward: 0 at z == 0
        elif ACT == 2:
            s = tl.sigmoid(z)
            d = s * (1.0 + z * (1.0 - s))
        elif ACT == 3:
            d = tl.where(z > 0.0, 1.0, tl.exp(z))
        elif ACT == 4:
            # Phi(z) + z * phi(z); 0.3989... = 1/sqrt(2*pi)
            d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) \
                + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        else:
            d = tl.full(z.shape, 1.0, z.dtype)
        return d

    @triton.jit
    def conv1x1_tile(acc, x_ptr, w_ptr, b_ptr, n, rco, rp, mco, mp, CIN, W,
                     sxn, sxc, sxh, sxw, swo, swi, sb,
                     HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc + W[rco] @ x[n][:, rp] (+ bias): one (out-channel x pixel) tile of the 1x1
        conv, shared by conv1x1_act's and conv1x1_residual's forward kernels."""
        rk = tl.arange(0, BLOCK_K)
        p_off = (rp // W).to(tl.int64) * sxh + (rp % W).to(tl.int64) * sxw
        x_base = x_ptr + n * sxn
        for k0 in range(0, CIN, BLOCK_K):
            ci = k0 + rk
            mci = ci < CIN
            wt = tl.load(w_ptr + rco[:, None] * swo + ci[None, :] * swi,
                         mask=mco[:, None] & mci[None, :], other=0.0)
            xt = tl.load(x_base + ci[:, None].to(tl.int64) * sxc + p_off[None, :],
                         mask=mci[:, None] & mp[None, :], other=0.0)
            acc += tl.dot(wt, xt, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(b_ptr + rco * sb, mask=mco, other=0.0)[:, None]
        return acc

    @triton.jit
    def _conv1x1_act_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr,
                                CIN, COUT, W, P,
                                sxn, sxc, sxh, sxw, swo, swi, sb,
                                HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                                STORE_Z: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_co = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        rco = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
        rp = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
        mco = rco < COUT
        mp = rp < P
        acc = conv1x1_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                           x_ptr, w_ptr, b_ptr, n, rco, rp, mco, mp, CIN, W,
                           sxn, sxc, sxh, sxw, swo, swi, sb, HAS_BIAS, BLOCK_K)
        out = n * COUT * P + rco[:, None].to(tl.int64) * P + rp[None, :]
        mout = mco[:, None] & mp[None, :]
        if STORE_Z:
            tl.store(z_ptr + out, acc, mask=mout)
        tl.store(y_ptr + out, _act_fwd(acc, ACT), mask=mout)

    @triton.jit
    def _conv1x1_act_bwd_dx_kernel(gy_ptr, z_ptr, w_ptr, scale_ptr, gx_ptr,
                                   CIN, COUT, W, P,
                                   sgn, sgc, sgh, sgw, swo, swi,
                                   ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
        # grad_x[n] (Cin x P) = [scale *] W^T (Cin x Cout) @ (gy * act'(z))[n] (Cout x P).
        # Here BLOCK_M tiles Cin (output rows) and BLOCK_K tiles Cout (the reduction).
        # The optional device scalar is conv1x1_residual's gate (ACT = 0 there).
        pid_p = tl.program_id(0)
        pid_ci = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        rci = pid_ci * BLOCK_M + tl.arange(0, BLOCK_M)
        rp = pid_p * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mci = rci < CIN
        mp = rp < P
        g_off = (rp // W).to(tl.int64) * sgh + (rp % W).to(tl.int64) * sgw
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=gx_ptr.dtype.element_ty)
        for k0 in range(0, COUT, BLOCK_K):
            co = k0 + rk
            mco = co < COUT
            m2 = mco[:, None] & mp[None, :]
            g = tl.load(gy_ptr + n * sgn + co[:, None].to(tl.int64) * sgc + g_off[None, :],
                        mask=m2, other=0.0)
            if ACT != 0:
                z = tl.load(z_ptr + n * COUT * P + co[:, None].to(tl.int64) * P + rp[None, :],
                            mask=m2, other=0.0)
                g = g * _act_grad(z, ACT)
            wt = tl.load(w_ptr + co[None, :] * swo + rci[:, None] * swi,
                         mask=mci[:, None] & mco[None, :], other=0.0)   # W^T tile
            acc += tl.dot(wt, g, input_precision="ieee")
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr)
        tl.store(gx_ptr + n * CIN * P + rci[:, None].to(tl.int64) * P + rp[None, :], acc,
                 mask=mci[:, None] & mp[None, :])

    @triton.jit
    def _conv1x1_act_bwd_dw_kernel(gy_ptr, z_ptr, x_ptr, gw_ptr, gb_ptr,
                                   CIN, COUT, W, P, TILES, TILES_PER_SPLIT,
                                   sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                                   ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                   BLOCK_K: tl.constexpr):
        # Partial grad_W[split] (Cout x Cin) = sum over this split's (image, pixel-block)
        # tiles of gz (Cout x BLOCK_N) @ x^T (BLOCK_N x Cin); here BLOCK_N is the reduction.
        pid_co = tl.program_id(0)
        pid_ci = tl.program_id(1)
        pid_s = tl.program_id(2)
        rco = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
        rci = pid_ci * BLOCK_K + tl.arange(0, BLOCK_K)
        mco = rco < COUT
        mci = rci < CIN
        num_pb = tl.cdiv(P, BLOCK_N)
        start = pid_s * TILES_PER_SPLIT
        end = tl.minimum(start + TILES_PER_SPLIT, TILES)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=gw_ptr.dtype.element_ty)
        accb = tl.zeros((BLOCK_M,), dtype=gw_ptr.dtype.element_ty)
        for t in range(start, end):
            n = (t // num_pb).to(tl.int64)
            rp = (t % num_pb) * BLOCK_N + tl.arange(0, BLOCK_N)
            mp = rp < P
            hh = (rp // W).to(tl.int64)
            ww = (rp % W).to(tl.int64)
            m2 = mco[:, None] & mp[None, :]
            g = tl.load(gy_ptr + n * sgn + rco[:, None].to(tl.int64) * sgc
                        + (hh * sgh + ww * sgw)[None, :], mask=m2, other=0.0)
            if ACT != 0:
                z = tl.load(z_ptr + n * COUT * P + rco[:, None].to(tl.int64) * P + rp[None, :],
                            mask=m2, other=0.0)
                g = g * _act_grad(z, ACT)
            xt = tl.load(x_ptr + n * sxn + rci[None, :].to(tl.int64) * sxc
                         + (hh * sxh + ww * sxw)[:, None],
                         mask=mp[:, None] & mci[None, :], other=0.0)   # x^T tile
            acc += tl.dot(g, xt, input_precision="ieee")
            if HAS_BIAS:
                accb += tl.sum(g, axis=1)
        base = pid_s.to(tl.int64) * COUT
        tl.store(gw_ptr + (base + rco[:, None]) * CIN + rci[None, :], acc,
                 mask=mco[:, None] & mci[None, :])
        if HAS_BIAS:
            if pid_ci == 0:  # every Cin block computes the same bias sum; one stores it
                tl.store(gb_ptr + base + rco, accb, mask=mco)


# ----------------------------------------------------------------------------- launchers

def conv1x1_act_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    activation: str = "silu", store_z: bool = True, blocks=None):
    """Launch the forward kernel; returns (y, z) with z the pre-activation (None if unused).

    ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) overrides the tile choice (the GPU tiles can
    then be exercised in the interpreter).
    """
    check_conv_args(x, weight, bias)
    check_triton_dtype(x)
    act = _check_activation(activation)
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    p = h * w
    y = torch.empty((n, cout, h, w), dtype=x.dtype, device=x.device)
    store_z = store_z and act != 0  # for "none", z is y itself and no derivative is needed
    z = torch.empty_like(y) if store_z else y
    if y.numel() == 0:
        return y, (z if store_z else None)
    bm, bn, bk = blocks or matmul_blocks(cout, p, cin)
    grid = (triton.cdiv(p, bn), triton.cdiv(cout, bm), n)
    launch(_conv1x1_act_fwd_kernel, grid,
        x, weight, bias if bias is not None else weight, y, z,
        cin, cout, w, p, *x.stride(), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        HAS_BIAS=bias is not None, ACT=act, STORE_Z=store_z,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y, (z if store_z else None)


def input_grad(grad_y: torch.Tensor, weight: torch.Tensor, z: torch.Tensor, act: int,
               in_shape, scale: torch.Tensor | None = None, blocks=None) -> torch.Tensor:
    """grad of the 1x1 conv input: [scale *] W^T @ (grad_y * act'(z)), contiguous NCHW.

    Shared with conv1x1_residual (act = 0, scale = its 1-element gate tensor).
    """
    n, cin, h, w = in_shape
    cout, p = weight.shape[0], h * w
    gx = torch.empty(in_shape, dtype=grad_y.dtype, device=grad_y.device)
    if gx.numel():
        bm, bn, bk = blocks or matmul_blocks(cin, p, cout)
        launch(_conv1x1_act_bwd_dx_kernel, (triton.cdiv(p, bn), triton.cdiv(cin, bm), n),
            grad_y, z, weight, scale if scale is not None else weight, gx, cin, cout, w, p,
            *grad_y.stride(), weight.stride(0), weight.stride(1),
            ACT=act, HAS_SCALE=scale is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return gx


def weight_grad_sums(grad_y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, act: int,
                     has_bias: bool, blocks=None):
    """(sum over pixels of gz @ x^T, sum of gz), gz = grad_y * act'(z): shapes (Cout, Cin), (Cout,).

    Shared with conv1x1_residual (act = 0, z unused), whose weight and bias gradients are
    the same reductions scaled by the gate. Deterministic: per-split partials, then a sum.
    """
    n, cin, h, w = x.shape
    cout, p = grad_y.shape[1], h * w
    bm, bn, bk = blocks or matmul_blocks(cout, p, cin)
    tiles = n * triton.cdiv(p, bn)
    grid2 = (triton.cdiv(cout, bm), triton.cdiv(cin, bk))
    split = reduction_split(tiles, grid2[0] * grid2[1]) if tiles else 1
    per = max(1, triton.cdiv(tiles, split))
    split = max(1, triton.cdiv(tiles, per))
    pw = torch.zeros((split, cout, cin), dtype=x.dtype, device=x.device)
    pb = torch.zeros((split, cout), dtype=x.dtype, device=x.device)
    if tiles:
        launch(_conv1x1_act_bwd_dw_kernel, grid2 + (split,),
            grad_y, z, x, pw, pb, cin, cout, w, p, tiles, per,
            *grad_y.stride(), *x.stride(),
            ACT=act, HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return pw.sum(0), pb.sum(0)


def conv1x1_act_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    z: torch.Tensor | None, activation: str, has_bias: bool,
                    need_x: bool = True, need_w: bool = True, blocks=None):
    """Gradients (grad_x, grad_weight, grad_bias); entries not needed are None."""
    act = _check_activation(activation)
    n, cin, h, w = x.shape
    cout = weight.shape[0]
    if tuple(grad_y.shape) != (n, cout, h, w):
        raise ValueError(f"grad_y shape {tuple(grad_y.shape)} != output shape {(n, cout, h, w)}")
    if grad_y.dtype != x.dtype or grad_y.device != x.device:
        raise ValueError("grad_y must match the input dtype and device")
    if act != 0 and (z is None or not z.is_contiguous()):
        raise ValueError("the saved pre-activation z must be a contiguous NCHW tensor")
    z_arg = z if z is not None else grad_y
    gx = gw = gb = None
    if need_x:
        gx = input_grad(grad_y, weight, z_arg, act, x.shape, blocks=blocks)
    if need_w or has_bias:
        a, sb = weight_grad_sums(grad_y, x, z_arg, act, has_bias, blocks)
        if need_w:
            gw = a.view(cout, cin, 1, 1)
        if has_bias:
            gb = sb
    return gx, gw, gb


# ----------------------------------------------------------------------------- ops

@kernel_op("conv1x1_act")
def conv1x1_act_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   activation: str, store_z: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, z): z is the pre-activation the backward needs, empty unless stored (store_z and
    an activation other than "none")."""
    y, z = conv1x1_act_fwd(x, weight, bias, activation, store_z)
    return y, (z if z is not None else y.new_empty(0))


def _pre_activation(z, grad_y, act: int) -> torch.Tensor:
    """z as the gradient kernels read it (contiguous NCHW); grad_y stands in, unread, for
    "none". The ops take any strides, as a compiler may hand saved tensors over in another
    layout."""
    if act == 0:
        return grad_y
    if z is None or z.shape != grad_y.shape:
        raise ValueError("the gradient of an activation needs its pre-activation z, of the "
                         "output's shape")
    return z.contiguous()


@kernel_op("conv1x1_input_grad")
def conv1x1_input_grad_op(grad_y: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None,
                          scale: torch.Tensor | None, activation: str) -> torch.Tensor:
    """[scale *] W^T @ (grad_y * act'(z)) of shape (N, Cin, H, W); z unused for "none"."""
    act = _check_activation(activation)
    n, _, h, w = grad_y.shape
    return input_grad(grad_y, weight, _pre_activation(z, grad_y, act), act,
                      (n, weight.shape[1], h, w), scale=scale)


@kernel_op("conv1x1_weight_grad")
def conv1x1_weight_grad_op(grad_y: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None,
                           activation: str, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over pixels of gz @ x^T (Cout, Cin), sum of gz (Cout,)) with gz = grad_y * act'(z);
    the second is zero without has_bias."""
    act = _check_activation(activation)
    return weight_grad_sums(grad_y, x, _pre_activation(z, grad_y, act), act, has_bias)


def _conv1x1_act_setup(ctx, inputs, output):
    x, weight, bias, activation, _ = inputs
    ctx.activation = activation
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _conv1x1_act_backward(ctx, grad_y, _grad_z):
    x, weight, z = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    act = _check_activation(ctx.activation)
    if act != 0 and z.numel() != grad_y.numel():
        raise RuntimeError("conv1x1_act: backward needs the pre-activation, which the forward "
                           "did not store (store_z=False)")
    z = z if act != 0 else None
    gx = gw = gb = None
    if need_x:
        gx = conv1x1_input_grad_op(grad_y, weight, z, None, ctx.activation)
    if need_w or (need_b and ctx.has_bias):
        a, s = conv1x1_weight_grad_op(grad_y, x, z, ctx.activation, ctx.has_bias and need_b)
        if need_w:
            gw = a.view(weight.shape)
        if need_b and ctx.has_bias:
            gb = s
    return gx, gw, gb, None, None


conv1x1_act_op.register_autograd(_conv1x1_act_backward, setup_context=_conv1x1_act_setup)


# ----------------------------------------------------------------------------- public

def conv1x1_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str = "silu") -> torch.Tensor:
    """act(conv1x1(x) + bias) with the Triton kernels: x (N,Cin,H,W), weight (Cout,Cin,1,1),
    bias (Cout,) or None, ``activation`` one of ``ACTIVATIONS``."""
    require_triton("conv1x1_act", x.device)
    check_conv_args(x, weight, bias)
    _check_activation(activation)
    need_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    return conv1x1_act_op(x, weight, bias, activation, need_grad)[0]
