"""DCT pseudoinputs: image -> normalised cropped DCT, and back.

Forward  u = clamp(crop_K(D_H ((x+1)/2) D_W^T) / scale, -1, 1)      x (N,C,H,W) -> u (N,C,K,K)
Inverse  x = 2 clamp(D_H[:K]^T (u*scale) D_W[:K], 0, 1) - 1        u (N,C,K,K) -> x (N,C,H,W)

D_N is the orthonormal DCT-II matrix, D[k,n] = s_k cos(pi (n+0.5) k / N) with s_0 = sqrt(1/N),
s_k = sqrt(2/N); the inverse DCT is its transpose.

The crop is folded into the basis: only the first K rows of D_H and D_W are used, so the
forward computes just the K x K kept coefficients and the inverse never builds the padded
H x W plane. One Triton program holds one (image, channel) plane and does both products
with tl.dot on tiles padded to powers of two >= 16, in IEEE precision (TF32 would put
about 1e-3 relative error into the coefficients). The forward's backward saves the
pre-clamp ratio v = coef/scale for the clamp mask; the inverse's backward recomputes the
pre-clamp image instead of saving an N*C*H*W tensor. Both masks are inclusive, as
torch.clamp's gradient.

``scale`` (C, K, K) must be strictly positive (the caller applies max(scale, 1)); it is a
buffer and gets no gradient. Triton path: float32/float64, H, W <= MAX_SIDE (one plane per
program), 1 <= K <= min(H, W); inputs may have any strides, outputs are contiguous.

Ops (torch.library.triton_op): dvpvae_kernels::dct_pseudoinput -> (u, v) and
dvpvae_kernels::idct_pseudoinput, with the backward ops dct_pseudoinput_bwd and
idct_pseudoinput_bwd.
"""
from __future__ import annotations

import functools
import math

import torch

from ._triton import concrete, kernel_op, launch, require_triton, tl, triton

MAX_SIDE = 128  # largest H, W of the Triton path: one program holds a whole plane
_TRITON_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=64)
def dct_basis(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """First ``k`` rows of the orthonormal DCT-II matrix of size ``n`` (shape (k, n)).

    Built in float64 and cast once, so float32 callers get correctly rounded entries.
    """
    idx = torch.arange(n, dtype=torch.float64)
    freq = torch.arange(k, dtype=torch.float64)[:, None]
    basis = torch.cos(math.pi * (idx[None, :] + 0.5) * freq / n) * math.sqrt(2.0 / n)
    basis[0] = math.sqrt(1.0 / n)
    return basis.to(device=device, dtype=dtype).contiguous()


# ----------------------------------------------------------------------------- reference

def _check_scale(scale: torch.Tensor, channels: int, k: int, ref: torch.Tensor) -> None:
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (channels, k, k):
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale must have shape (C, ctx, ctx) = {(channels, k, k)}, got {got}")
    if scale.device != ref.device:
        raise ValueError(f"scale is on {scale.device} but the input is on {ref.device}")
    if scale.dtype != ref.dtype:
        raise ValueError(f"scale dtype {scale.dtype} differs from the input dtype {ref.dtype}")


def _check_fwd_args(x: torch.Tensor, scale: torch.Tensor, ctx_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got shape "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(ctx_size, bool) or not isinstance(ctx_size, int):
        raise ValueError(f"ctx_size must be an int, got {ctx_size!r}")
    _, c, h, w = x.shape
    if not 1 <= ctx_size <= min(h, w):
        raise ValueError(f"ctx_size must be in [1, min(H, W)] = [1, {min(h, w)}], got {ctx_size}")
    _check_scale(scale, c, ctx_size, x)


def _check_inv_args(u: torch.Tensor, scale: torch.Tensor, size) -> tuple[int, int]:
    if not isinstance(u, torch.Tensor) or u.dim() != 4 or u.shape[2] != u.shape[3]:
        raise ValueError(f"u must be a 4-D (N, C, ctx, ctx) tensor, got shape "
                         f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
    if not u.is_floating_point():
        raise ValueError(f"u must be a floating-point tensor, got {u.dtype}")
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair (H, W), got {size!r}") from None
    k = u.shape[2]
    if h < k or w < k:
        raise ValueError(f"size {(h, w)} is smaller than the ctx size {k}")
    _check_scale(scale, u.shape[1], k, u)
    return h, w


def dct_pseudoinput_ref(x: torch.Tensor, scale: torch.Tensor, ctx_size: int) -> torch.Tensor:
    """Plain-PyTorch forward: (x+1)/2 -> cropped orthonormal DCT-II -> / scale -> clamp.

    ``scale`` (C, ctx, ctx) must be strictly positive (the caller guards it with max(., 1)).
    """
    _check_fwd_args(x, scale, ctx_size)
    dh = dct_basis(x.shape[2], ctx_size, x.dtype, x.device)
    dw = dct_basis(x.shape[3], ctx_size, x.dtype, x.device)
    coef = dh @ ((x + 1) * 0.5) @ dw.t()  # (N, C, K, K): row transform, then column
    return torch.clamp(coef / scale, -1.0, 1.0)


def idct_pseudoinput_ref(u: torch.Tensor, scale: torch.Tensor, size) -> torch.Tensor:
    """Plain-PyTorch inverse: u*scale -> zero-pad to size -> inverse DCT -> clamp[0,1] -> 2v-1."""
    h, w = _check_inv_args(u, scale, size)
    k = u.shape[2]
    dh = dct_basis(h, k, u.dtype, u.device)
    dw = dct_basis(w, k, u.dtype, u.device)
    # dh^T (u*scale) dw equals the inverse DCT of the zero-padded H x W coefficient plane.
    img = dh.t() @ (u * scale) @ dw
    return 2.0 * torch.clamp(img, 0.0, 1.0) - 1.0


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _basis_rows(d_ptr, N, rk, rn, K):
        """Rows D[:K] of an (K, N) DCT basis as a (BK x BN) tile, zero outside."""
        return tl.load(d_ptr + rk[:, None] * N + rn[None, :],
                       mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)

    @triton.jit
    def _basis_cols(d_ptr, N, rk, rn, K):
        """D[:K]^T as a (BN x BK) tile, zero outside."""
        return tl.load(d_ptr + rk[None, :] * N + rn[:, None],
                       mask=(rk[None, :] < K) & (rn[:, None] < N), other=0.0)

    @triton.jit
    def _scale_tile(scale_ptr, c, ssc, ssi, ssj, rk, mkk):
        """The K x K scale of channel c; 1 outside, so masked divisions stay finite."""
        return tl.load(scale_ptr + c * ssc + rk[:, None] * ssi + rk[None, :] * ssj,
                       mask=mkk, other=1.0)

    @triton.jit
    def _dct_fwd_kernel(x_ptr, dh_ptr, dw_ptr, scale_ptr, u_ptr, v_ptr,
                        C, H, W, K,
                        sxn, sxc, sxh, sxw, ssc, ssi, ssj,
                        SAVE_V: tl.constexpr,
                        BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)  # one program per (image, channel)
        n = pid // C
        c = pid % C
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        rk = tl.arange(0, BK)
        mh = rh < H
        mw = rw < W
        mk = rk < K
        img = tl.load(x_ptr + n * sxn + c * sxc + rh[:, None] * sxh + rw[None, :] * sxw,
                      mask=mh[:, None] & mw[None, :], other=-1.0)
        img = (img + 1.0) * 0.5  # padding (-1) maps to 0, so it adds nothing to the dots
        # Cropped basis rows D_H[:K] (BK x BH) and D_W[:K]^T (BW x BK); zero outside.
        dh = _basis_rows(dh_ptr, H, rk, rh, K)
        dwt = _basis_cols(dw_ptr, W, rk, rw, K)
        rows = tl.dot(dh, img, input_precision="ieee")        # (BK x BW)
        coef = tl.dot(rows, dwt, input_precision="ieee")      # (BK x BK)
        mkk = mk[:, None] & mk[None, :]
        s = _scale_tile(scale_ptr, c, ssc, ssi, ssj, rk, mkk)
        v = coef / s
        u = tl.minimum(tl.maximum(v, -1.0), 1.0)
        out = pid * K * K + rk[:, None] * K + rk[None, :]
        tl.store(u_ptr + out, u, mask=mkk)
        if SAVE_V:
            tl.store(v_ptr + out, v, mask=mkk)

    @triton.jit
    def _dct_bwd_kernel(gu_ptr, v_ptr, dh_ptr, dw_ptr, scale_ptr, gx_ptr,
                        C, H, W, K,
                        sgn, sgc, sgi, sgj, ssc, ssi, ssj,
                        BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        n = pid // C
        c = pid % C
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        rk = tl.arange(0, BK)
        mh = rh < H
        mw = rw < W
        mk = rk < K
        mkk = mk[:, None] & mk[None, :]
        g = tl.load(gu_ptr + n * sgn + c * sgc + rk[:, None] * sgi + rk[None, :] * sgj,
                    mask=mkk, other=0.0)
        v = tl.load(v_ptr + pid * K * K + rk[:, None] * K + rk[None, :], mask=mkk, other=0.0)
        s = _scale_tile(scale_ptr, c, ssc, ssi, ssj, rk, mkk)
        # Inclusive mask like torch.clamp's backward; then d(coef/s)/dcoef = 1/s.
        gc = tl.where((v >= -1.0) & (v <= 1.0), g / s, 0.0)
        dht = _basis_cols(dh_ptr, H, rk, rh, K)    # D_H[:K]^T (BH x BK)
        dw = _basis_rows(dw_ptr, W, rk, rw, K)    # D_W[:K]   (BK x BW)
        t = tl.dot(dht, gc, input_precision="ieee")               # (BH x BK)
        gx = tl.dot(t, dw, input_precision="ieee") * 0.5          # (BH x BW); d((x+1)/2) = 1/2
        tl.store(gx_ptr + pid * H * W + rh[:, None] * W + rw[None, :], gx,
                 mask=mh[:, None] & mw[None, :])

    @triton.jit
    def _idct_image(u_ptr, dh_ptr, dw_ptr, scale_ptr, n, c, H, W, K,
                    sun, suc, sui, suj, ssc, ssi, ssj,
                    BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
        """Pre-clamp image D_H[:K]^T (u*scale) D_W[:K] of one (image, channel), (BH x BW)."""
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        rk = tl.arange(0, BK)
        mk = rk < K
        mkk = mk[:, None] & mk[None, :]
        u = tl.load(u_ptr + n * sun + c * suc + rk[:, None] * sui + rk[None, :] * suj,
                    mask=mkk, other=0.0)
        s = _scale_tile(scale_ptr, c, ssc, ssi, ssj, rk, mkk)
        dht = _basis_cols(dh_ptr, H, rk, rh, K)
        dw = _basis_rows(dw_ptr, W, rk, rw, K)
        t = tl.dot(dht, u * s, input_precision="ieee")            # (BH x BK)
        return tl.dot(t, dw, input_precision="ieee")              # (BH x BW)

    @triton.jit
    def _idct_fwd_kernel(u_ptr, dh_ptr, dw_ptr, scale_ptr, x_ptr,
                         C, H, W, K,
                         sun, suc, sui, suj, ssc, ssi, ssj,
                         BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        n = pid // C
        c = pid % C
        img = _idct_image(u_ptr, dh_ptr, dw_ptr, scale_ptr, n, c, H, W, K,
                          sun, suc, sui, suj, ssc, ssi, ssj, BH, BW, BK)
        y = 2.0 * tl.minimum(tl.maximum(img, 0.0), 1.0) - 1.0
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        tl.store(x_ptr + pid * H * W + rh[:, None] * W + rw[None, :], y,
                 mask=(rh[:, None] < H) & (rw[None, :] < W))

    @triton.jit
    def _idct_bwd_kernel(gx_ptr, u_ptr, dh_ptr, dw_ptr, scale_ptr, gu_ptr,
                         C, H, W, K,
                         sgn, sgc, sgh, sgw, sun, suc, sui, suj, ssc, ssi, ssj,
                         BH: tl.constexpr, BW: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        n = pid // C
        c = pid % C
        # Recompute the pre-clamp image (cheaper than storing an N*C*H*W tensor).
        img = _idct_image(u_ptr, dh_ptr, dw_ptr, scale_ptr, n, c, H, W, K,
                          sun, suc, sui, suj, ssc, ssi, ssj, BH, BW, BK)
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        rk = tl.arange(0, BK)
        mh = rh < H
        mw = rw < W
        mk = rk < K
        g = tl.load(gx_ptr + n * sgn + c * sgc + rh[:, None] * sgh + rw[None, :] * sgw,
                    mask=mh[:, None] & mw[None, :], other=0.0)
        gv = tl.where((img >= 0.0) & (img <= 1.0), 2.0 * g, 0.0)
        dh = _basis_rows(dh_ptr, H, rk, rh, K)    # (BK x BH)
        dwt = _basis_cols(dw_ptr, W, rk, rw, K)   # (BW x BK)
        t = tl.dot(dh, gv, input_precision="ieee")                # (BK x BW)
        gcoef = tl.dot(t, dwt, input_precision="ieee")            # (BK x BK)
        mkk = mk[:, None] & mk[None, :]
        s = _scale_tile(scale_ptr, c, ssc, ssi, ssj, rk, mkk)
        tl.store(gu_ptr + pid * K * K + rk[:, None] * K + rk[None, :], gcoef * s, mask=mkk)


# ----------------------------------------------------------------------------- launchers

def _bases(h: int, w: int, k: int, like: torch.Tensor):
    """(D_H[:k], D_W[:k]) in ``like``'s dtype and device; built uncached while tracing, as
    traced tensors must not outlive the trace in dct_basis' cache."""
    build = dct_basis if concrete(like) else dct_basis.__wrapped__
    return build(h, k, like.dtype, like.device), build(w, k, like.dtype, like.device)


def _block(n: int) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(16, triton.next_power_of_2(n))


def _check_triton_tensor(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype not in _TRITON_DTYPES:
        raise ValueError(f"the triton DCT kernels support float32/float64 {name}, got {t.dtype}; "
                         "dct_pseudoinput_ref/idct_pseudoinput_ref take other dtypes")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"{name} must match dtype/device {like.dtype}/{like.device}, "
                         f"got {t.dtype}/{t.device}")


def _check_sides(h: int, w: int) -> None:
    if h > MAX_SIDE or w > MAX_SIDE:
        raise ValueError(f"triton DCT holds one H x W plane per program: H, W <= {MAX_SIDE}, "
                         f"got {(h, w)}; dct_pseudoinput_ref/idct_pseudoinput_ref take larger ones")


def dct_pseudoinput_fwd(x: torch.Tensor, scale: torch.Tensor, ctx_size: int,
                        save_v: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the forward kernel; returns (u, v) with v the pre-clamp ratio (or None)."""
    _check_fwd_args(x, scale, ctx_size)
    _check_triton_tensor("x", x, x)
    _check_triton_tensor("scale", scale, x)
    n, c, h, w = x.shape
    _check_sides(h, w)
    k = ctx_size
    u = torch.empty((n, c, k, k), dtype=x.dtype, device=x.device)
    v = torch.empty_like(u) if save_v else u  # dummy pointer when not saved
    if n * c == 0:
        return u, (v if save_v else None)
    dh, dw = _bases(h, w, k, x)
    launch(_dct_fwd_kernel, (n * c,),
        x, dh, dw, scale, u, v, c, h, w, k,
        *x.stride(), *scale.stride(),
        SAVE_V=save_v, BH=_block(h), BW=_block(w), BK=_block(k))
    return u, (v if save_v else None)


def dct_pseudoinput_bwd(grad_u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                        size: tuple[int, int]) -> torch.Tensor:
    """Gradient w.r.t. x of the forward op, from grad_u and the saved pre-clamp ratio v."""
    n, c, k, _ = v.shape
    h, w = size
    if tuple(grad_u.shape) != tuple(v.shape):
        raise ValueError(f"grad_u shape {tuple(grad_u.shape)} != u shape {tuple(v.shape)}")
    _check_triton_tensor("grad_u", grad_u, v)
    gx = torch.empty((n, c, h, w), dtype=v.dtype, device=v.device)
    if n * c == 0:
        return gx
    dh, dw = _bases(h, w, k, v)
    launch(_dct_bwd_kernel, (n * c,),
        grad_u, v.contiguous(), dh, dw, scale, gx, c, h, w, k,
        *grad_u.stride(), *scale.stride(),
        BH=_block(h), BW=_block(w), BK=_block(k))
    return gx


def idct_pseudoinput_fwd(u: torch.Tensor, scale: torch.Tensor, size) -> torch.Tensor:
    """Launch the inverse kernel: u (N,C,K,K) -> image (N,C,H,W) in [-1, 1]."""
    h, w = _check_inv_args(u, scale, size)
    _check_triton_tensor("u", u, u)
    _check_triton_tensor("scale", scale, u)
    _check_sides(h, w)
    n, c, k, _ = u.shape
    x = torch.empty((n, c, h, w), dtype=u.dtype, device=u.device)
    if n * c == 0:
        return x
    dh, dw = _bases(h, w, k, u)
    launch(_idct_fwd_kernel, (n * c,),
        u, dh, dw, scale, x, c, h, w, k,
        *u.stride(), *scale.stride(),
        BH=_block(h), BW=_block(w), BK=_block(k))
    return x


def idct_pseudoinput_bwd(grad_x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor,
                         size: tuple[int, int]) -> torch.Tensor:
    """Gradient w.r.t. u of the inverse op (recomputes the pre-clamp image from u)."""
    n, c, k, _ = u.shape
    h, w = size
    if tuple(grad_x.shape) != (n, c, h, w):
        raise ValueError(f"grad_x shape {tuple(grad_x.shape)} != output shape {(n, c, h, w)}")
    _check_triton_tensor("grad_x", grad_x, u)
    gu = torch.empty_like(u, memory_format=torch.contiguous_format)
    if n * c == 0:
        return gu
    dh, dw = _bases(h, w, k, u)
    launch(_idct_bwd_kernel, (n * c,),
        grad_x, u, dh, dw, scale, gu, c, h, w, k,
        *grad_x.stride(), *u.stride(), *scale.stride(),
        BH=_block(h), BW=_block(w), BK=_block(k))
    return gu


# ----------------------------------------------------------------------------- ops

def _no_scale_grad(scale: torch.Tensor) -> None:
    if scale.requires_grad:
        raise ValueError("scale is a non-trainable buffer and gets no gradient from the "
                         "triton kernels; pass scale.detach()")


@kernel_op("dct_pseudoinput")
def dct_pseudoinput_op(x: torch.Tensor, scale: torch.Tensor, ctx_size: int,
                       save_v: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v): v is the pre-clamp ratio the backward needs, empty unless ``save_v``."""
    u, v = dct_pseudoinput_fwd(x, scale, ctx_size, save_v)
    return u, (v if v is not None else u.new_empty(0))


@kernel_op("dct_pseudoinput_bwd")
def dct_pseudoinput_bwd_op(grad_u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                           height: int, width: int) -> torch.Tensor:
    return dct_pseudoinput_bwd(grad_u, v, scale, (height, width))


@kernel_op("idct_pseudoinput")
def idct_pseudoinput_op(u: torch.Tensor, scale: torch.Tensor, height: int,
                        width: int) -> torch.Tensor:
    return idct_pseudoinput_fwd(u, scale, (height, width))


@kernel_op("idct_pseudoinput_bwd")
def idct_pseudoinput_bwd_op(grad_x: torch.Tensor, u: torch.Tensor, scale: torch.Tensor,
                            height: int, width: int) -> torch.Tensor:
    return idct_pseudoinput_bwd(grad_x, u, scale, (height, width))


def _dct_setup(ctx, inputs, output):
    x, scale, _, _ = inputs
    ctx.save_for_backward(output[1], scale)
    ctx.size = (x.shape[2], x.shape[3])
    ctx.mark_non_differentiable(output[1])


def _dct_backward(ctx, grad_u, _grad_v):
    v, scale = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    if v.numel() != grad_u.numel():
        raise RuntimeError("dct_pseudoinput: backward needs the pre-clamp ratio, which the "
                           "forward did not store (save_v=False)")
    return dct_pseudoinput_bwd_op(grad_u, v, scale, *ctx.size), None, None, None


def _idct_setup(ctx, inputs, output):
    u, scale, height, width = inputs
    ctx.save_for_backward(u, scale)
    ctx.size = (height, width)


def _idct_backward(ctx, grad_x):
    u, scale = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return idct_pseudoinput_bwd_op(grad_x, u, scale, *ctx.size), None, None, None


dct_pseudoinput_op.register_autograd(_dct_backward, setup_context=_dct_setup)
idct_pseudoinput_op.register_autograd(_idct_backward, setup_context=_idct_setup)


# ----------------------------------------------------------------------------- public

def dct_pseudoinput(x: torch.Tensor, scale: torch.Tensor, ctx_size: int) -> torch.Tensor:
    """Normalised DCT pseudoinput u (N,C,ctx,ctx) in [-1,1] of images x (N,C,H,W) in [-1,1],
    with the Triton kernels. ``scale`` (C, ctx, ctx) must be strictly positive."""
    require_triton("dct_pseudoinput", x.device)
    _check_fwd_args(x, scale, ctx_size)
    _no_scale_grad(scale)
    return dct_pseudoinput_op(x, scale, ctx_size, torch.is_grad_enabled() and x.requires_grad)[0]


def idct_pseudoinput(u: torch.Tensor, scale: torch.Tensor, size) -> torch.Tensor:
    """Image (N,C,H,W) in [-1,1] of pseudoinputs u (N,C,ctx,ctx), with the Triton kernels;
    ``size`` = (H, W)."""
    require_triton("idct_pseudoinput", u.device)
    h, w = _check_inv_args(u, scale, size)
    _no_scale_grad(scale)
    return idct_pseudoinput_op(u, scale, h, w)
