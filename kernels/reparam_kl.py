"""Fused top-down latent step: log-variance clamps, reparameterization and the analytic KL.

    lq = clamp(q_logvar, min_logvar, MAX_LOGVAR)    lp = clamp(p_logvar, min_logvar, MAX_LOGVAR)
    z  = q_mu + exp(lq / 2) * eps
    kl = sum_{dims > 0} 0.5 * (lp - lq + (exp(lq) + (q_mu - p_mu)^2) * exp(-lp) - 1)   (N,)

and the sampling variant ``reparam_sample``: z = p_mu + exp(lp / 2) * sqrt(T) * eps
(temperature T multiplies the variance).

The forward reads the five inputs once and writes z and one scalar per example; the
backward recomputes everything from the saved inputs and writes the gradients in one pass.

The KL reduction is deterministic (no atomics, so training is bitwise repeatable): the
grid is (N, S), program (n, s) sums one contiguous chunk of example n and writes
partial[n, s], and the S partials are summed by torch in a fixed order. S = 1 when N
programs already fill the GPU; smaller batches split D.

Inputs are flattened to (N, D) with int64 offsets. Scalars (min_logvar, sqrt(T)) travel
as fp32 kernel arguments; accumulation is fp32 (fp64 for fp64 inputs). The public ops copy
non-contiguous inputs; the launchers require contiguous ones.

Ops (torch.library.triton_op): dvpvae_kernels::reparam_kl -> (z, kl) and
dvpvae_kernels::reparam_sample, with the backward ops reparam_kl_bwd and reparam_sample_bwd.
"""
from __future__ import annotations

import torch

from ._elementwise_common import acc_dtype, check_matching, flat_config
from ._triton import interpreting, kernel_op, launch, require_triton, tl, triton

MAX_LOGVAR = 1.0  # upper clamp of every log-variance in the model


# --------------------------------------------------------------------------- reference
def reparam_kl_ref(q_mu, q_logvar, p_mu, p_logvar, eps, min_logvar):
    """Plain-PyTorch reference; same signature and semantics as ``reparam_kl``."""
    lq = torch.clamp(q_logvar, min_logvar, MAX_LOGVAR)
    lp = torch.clamp(p_logvar, min_logvar, MAX_LOGVAR)
    z = q_mu + torch.exp(0.5 * lq) * eps
    kl = 0.5 * (lp - lq + (torch.exp(lq) + (q_mu - p_mu) ** 2) * torch.exp(-lp) - 1.0)
    return z, kl.reshape(kl.shape[0], -1).sum(dim=1)


def reparam_sample_ref(p_mu, p_logvar, eps, min_logvar, temperature=1.0):
    """Plain-PyTorch reference; same signature and semantics as ``reparam_sample``."""
    lp = torch.clamp(p_logvar, min_logvar, MAX_LOGVAR)
    return p_mu + torch.exp(0.5 * lp) * (float(temperature) ** 0.5) * eps


# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit
    def _clamp(x, lo, hi):
        return tl.minimum(tl.maximum(x, lo), hi)

    @triton.jit
    def _load_inputs(qm_ptr, qlv_ptr, pm_ptr, plv_ptr, eps_ptr, idx, mask, ACC: tl.constexpr):
        """(q_mu, q_logvar, p_mu, p_logvar, eps) at ``idx`` in the accumulation dtype."""
        qm = tl.load(qm_ptr + idx, mask=mask, other=0.0).to(ACC)
        qlv = tl.load(qlv_ptr + idx, mask=mask, other=0.0).to(ACC)
        pm = tl.load(pm_ptr + idx, mask=mask, other=0.0).to(ACC)
        plv = tl.load(plv_ptr + idx, mask=mask, other=0.0).to(ACC)
        e = tl.load(eps_ptr + idx, mask=mask, other=0.0).to(ACC)
        return qm, qlv, pm, plv, e

    @triton.jit
    def _reparam_kl_fwd_kernel(qm_ptr, qlv_ptr, pm_ptr, plv_ptr, eps_ptr, z_ptr, part_ptr,
                               D, chunk, n_splits, min_logvar, max_logvar,
                               BLOCK: tl.constexpr, ACC: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        # Scalars arrive as fp32 (or as Python floats in the interpreter); cast once so the
        # arithmetic runs in the accumulation dtype whatever the caller passed (1 vs 1.0).
        lo = tl.cast(min_logvar, ACC)
        hi = tl.cast(max_logvar, ACC)
        base = row.to(tl.int64) * D
        start = split * chunk
        acc = tl.zeros([BLOCK], dtype=ACC)
        # `chunk` is a multiple of BLOCK, so `cols < D` is the only bound to check.
        for off in range(0, chunk, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            mask = cols < D
            idx = base + cols
            qm, qlv, pm, plv, e = _load_inputs(qm_ptr, qlv_ptr, pm_ptr, plv_ptr, eps_ptr, idx, mask, ACC)
            lq = _clamp(qlv, lo, hi)
            lp = _clamp(plv, lo, hi)
            std_q = tl.exp(0.5 * lq)  # exp(lq) = std_q^2: one exp fewer per element
            tl.store(z_ptr + idx, (qm + std_q * e).to(z_ptr.dtype.element_ty), mask=mask)
            d = qm - pm
            term = 0.5 * (lp - lq + (std_q * std_q + d * d) * tl.exp(-lp) - 1.0)
            acc += tl.where(mask, term, 0.0)
        tl.store(part_ptr + row * n_splits + split, tl.sum(acc, axis=0))

    @triton.jit
    def _reparam_kl_bwd_kernel(qm_ptr, qlv_ptr, pm_ptr, plv_ptr, eps_ptr, gz_ptr, gk_ptr,
                               dqm_ptr, dqlv_ptr, dpm_ptr, dplv_ptr, deps_ptr,
                               D, chunk, stride_gk, min_logvar, max_logvar,
                               BLOCK: tl.constexpr, ACC: tl.constexpr, HAS_GZ: tl.constexpr,
                               HAS_GK: tl.constexpr, NEED_EPS: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        lo = tl.cast(min_logvar, ACC)
        hi = tl.cast(max_logvar, ACC)
        base = row.to(tl.int64) * D
        start = split * chunk
        # grad of kl[n] is one scalar per example; its tensor may be an expanded view
        # (stride 0) when kl was reduced further, hence the explicit stride.
        if HAS_GK:
            gk = tl.load(gk_ptr + row.to(tl.int64) * stride_gk).to(ACC)
        else:
            gk = tl.cast(0.0, ACC)
        for off in range(0, chunk, BLOCK):
            cols = start + off + tl.arange(0, BLOCK)
            mask = cols < D
            idx = base + cols
            qm, qlv, pm, plv, e = _load_inputs(qm_ptr, qlv_ptr, pm_ptr, plv_ptr, eps_ptr, idx, mask, ACC)
            lq = _clamp(qlv, lo, hi)
            lp = _clamp(plv, lo, hi)
            # torch.clamp passes the gradient on the closed interval [lo, hi].
            q_in = (qlv >= lo) & (qlv <= hi)
            p_in = (plv >= lo) & (plv <= hi)
            std_q = tl.exp(0.5 * lq)
            inv_vp = tl.exp(-lp)
            d = qm - pm
            if HAS_GZ:
                gz = tl.load(gz_ptr + idx, mask=mask, other=0.0).to(ACC)
            else:
                gz = tl.zeros([BLOCK], dtype=ACC)
            gd = gk * d * inv_vp                        # d kl / d q_mu
            g_lq = 0.5 * gz * e * std_q + 0.5 * gk * (std_q * std_q * inv_vp - 1.0)
            g_lp = 0.5 * gk * (1.0 - (std_q * std_q + d * d) * inv_vp)
            tl.store(dqm_ptr + idx, (gz + gd).to(dqm_ptr.dtype.element_ty), mask=mask)
            tl.store(dpm_ptr + idx, (-gd).to(dpm_ptr.dtype.element_ty), mask=mask)
            tl.store(dqlv_ptr + idx, tl.where(q_in, g_lq, 0.0).to(dqlv_ptr.dtype.element_ty), mask=mask)
            tl.store(dplv_ptr + idx, tl.where(p_in, g_lp, 0.0).to(dplv_ptr.dtype.element_ty), mask=mask)
            if NEED_EPS:
                tl.store(deps_ptr + idx, (gz * std_q).to(deps_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _reparam_sample_fwd_kernel(pm_ptr, plv_ptr, eps_ptr, z_ptr, numel, min_logvar, max_logvar,
                                   sqrt_temp, BLOCK: tl.constexpr, ACC: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        lo = tl.cast(min_logvar, ACC)
        hi = tl.cast(max_logvar, ACC)
        st = tl.cast(sqrt_temp, ACC)
        pm = tl.load(pm_ptr + offs, mask=mask, other=0.0).to(ACC)
        lp = _clamp(tl.load(plv_ptr + offs, mask=mask, other=0.0).to(ACC), lo, hi)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(z_ptr + offs, (pm + tl.exp(0.5 * lp) * st * e).to(z_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _reparam_sample_bwd_kernel(plv_ptr, eps_ptr, gz_ptr, dplv_ptr, deps_ptr, numel,
                                   min_logvar, max_logvar, sqrt_temp,
                                   BLOCK: tl.constexpr, ACC: tl.constexpr, NEED_EPS: tl.constexpr):
        # d z / d p_mu = 1, so the p_mu gradient is grad_z itself and needs no kernel.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        lo = tl.cast(min_logvar, ACC)
        hi = tl.cast(max_logvar, ACC)
        st = tl.cast(sqrt_temp, ACC)
        plv = tl.load(plv_ptr + offs, mask=mask, other=0.0).to(ACC)
        lp = _clamp(plv, lo, hi)
        e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(ACC)
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(ACC)
        scale = tl.exp(0.5 * lp) * st
        g_lp = tl.where((plv >= lo) & (plv <= hi), 0.5 * gz * e * scale, 0.0)
        tl.store(dplv_ptr + offs, g_lp.to(dplv_ptr.dtype.element_ty), mask=mask)
        if NEED_EPS:
            tl.store(deps_ptr + offs, (gz * scale).to(deps_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def _check_inputs(op, names, tensors):
    check_matching(op, names, tensors)
    ref = tensors[0]
    if ref.dim() < 1 or ref.shape[0] < 1:
        raise ValueError(f"{op}: inputs need a non-empty batch dimension, got {tuple(ref.shape)}")


def _launch_config(N, D, splits=None):
    """(BLOCK, chunk, S, num_warps) for an (N, D) problem."""
    block = max(16, min(1024, triton.next_power_of_2(D)))
    tiles = triton.cdiv(D, block)
    if splits is None:
        # The interpreter pays per program, so it always gets one per example. On a GPU,
        # split D only when N programs would leave most of the SMs idle.
        splits = 1 if (N >= 256 or interpreting()) else min(tiles, triton.cdiv(512, N))
    splits = max(1, min(int(splits), tiles))
    chunk = triton.cdiv(tiles, splits) * block
    splits = triton.cdiv(D, chunk)
    num_warps = 4 if block >= 512 else (2 if block >= 128 else 1)
    return block, chunk, splits, num_warps


def reparam_kl_fwd(q_mu, q_logvar, p_mu, p_logvar, eps, min_logvar, splits=None):
    """Launch the forward kernel; returns (z, kl). ``splits`` overrides S (the GPU's split
    reduction can then be exercised in the interpreter)."""
    names = ("q_mu", "q_logvar", "p_mu", "p_logvar", "eps")
    tensors = (q_mu, q_logvar, p_mu, p_logvar, eps)
    _check_inputs("reparam_kl", names, tensors)
    N = q_mu.shape[0]
    D = q_mu.numel() // N
    z = torch.empty_like(q_mu)
    acc = torch.float64 if q_mu.dtype == torch.float64 else torch.float32
    if D == 0:
        return z, torch.zeros(N, dtype=q_mu.dtype, device=q_mu.device)
    block, chunk, S, num_warps = _launch_config(N, D, splits)
    partial = torch.empty((N, S), dtype=acc, device=q_mu.device)
    launch(_reparam_kl_fwd_kernel, (N, S), q_mu, q_logvar, p_mu, p_logvar, eps, z, partial,
           D, chunk, S, float(min_logvar), MAX_LOGVAR,
           BLOCK=block, ACC=acc_dtype(q_mu.dtype), num_warps=num_warps)
    kl = partial[:, 0] if S == 1 else partial.sum(dim=1)  # fixed-order: deterministic
    return z, kl.to(q_mu.dtype)


def reparam_kl_bwd(q_mu, q_logvar, p_mu, p_logvar, eps, grad_z, grad_kl, min_logvar,
                   need_eps=False, splits=None):
    """Launch the backward kernel; returns (d q_mu, d q_logvar, d p_mu, d p_logvar, d eps).

    ``grad_z`` / ``grad_kl`` may be None (that output did not reach the loss).
    """
    N = q_mu.shape[0]
    D = q_mu.numel() // N
    if grad_z is not None:
        grad_z = grad_z.contiguous()
        if grad_z.shape != q_mu.shape:
            raise ValueError(f"reparam_kl backward: grad_z shape {tuple(grad_z.shape)} != "
                             f"{tuple(q_mu.shape)}")
    if grad_kl is not None and grad_kl.shape != (N,):
        raise ValueError(f"reparam_kl backward: grad_kl shape {tuple(grad_kl.shape)} != ({N},)")
    grads = [torch.empty_like(q_mu) for _ in range(4)]
    d_eps = torch.empty_like(q_mu) if need_eps else None
    if D == 0:
        return (*grads, d_eps)
    block, chunk, S, num_warps = _launch_config(N, D, splits)
    dummy = q_mu  # never dereferenced: the matching constexpr flag is False
    launch(
        _reparam_kl_bwd_kernel, (N, S),
        q_mu, q_logvar, p_mu, p_logvar, eps,
        grad_z if grad_z is not None else dummy, grad_kl if grad_kl is not None else dummy,
        *grads, d_eps if need_eps else dummy,
        D, chunk, grad_kl.stride(0) if grad_kl is not None else 0,
        float(min_logvar), MAX_LOGVAR,
        BLOCK=block, ACC=acc_dtype(q_mu.dtype), HAS_GZ=grad_z is not None,
        HAS_GK=grad_kl is not None, NEED_EPS=need_eps, num_warps=num_warps)
    return (*grads, d_eps)


def reparam_sample_fwd(p_mu, p_logvar, eps, min_logvar, temperature):
    _check_inputs("reparam_sample", ("p_mu", "p_logvar", "eps"), (p_mu, p_logvar, eps))
    z = torch.empty_like(p_mu)
    numel = p_mu.numel()
    if numel:
        block, grid, num_warps = flat_config(numel)
        launch(_reparam_sample_fwd_kernel, (grid,), p_mu, p_logvar, eps, z, numel,
               float(min_logvar), MAX_LOGVAR, float(temperature) ** 0.5, BLOCK=block,
               ACC=acc_dtype(p_mu.dtype), num_warps=num_warps)
    return z


def reparam_sample_bwd(p_logvar, eps, grad_z, min_logvar, temperature, need_eps=False):
    grad_z = grad_z.contiguous()
    if grad_z.shape != p_logvar.shape:
        raise ValueError(f"reparam_sample backward: grad_z shape {tuple(grad_z.shape)} != "
                         f"{tuple(p_logvar.shape)}")
    d_plv = torch.empty_like(p_logvar)
    d_eps = torch.empty_like(p_logvar) if need_eps else None
    numel = p_logvar.numel()
    if numel:
        block, grid, num_warps = flat_config(numel)
        launch(_reparam_sample_bwd_kernel, (grid,), p_logvar, eps, grad_z, d_plv,
               d_eps if need_eps else d_plv, numel, float(min_logvar), MAX_LOGVAR,
               float(temperature) ** 0.5, BLOCK=block, ACC=acc_dtype(p_logvar.dtype),
               NEED_EPS=need_eps, num_warps=num_warps)
    return d_plv, d_eps


# --------------------------------------------------------------------------- ops
Tensor = torch.Tensor


def _dense(*tensors):
    # The kernels index the inputs as flat contiguous arrays; the ops take any strides, as a
    # compiler may hand saved tensors over in another layout.
    return tuple(t.contiguous() for t in tensors)


@kernel_op("reparam_kl")
def reparam_kl_op(q_mu: Tensor, q_logvar: Tensor, p_mu: Tensor, p_logvar: Tensor, eps: Tensor,
                  min_logvar: float) -> tuple[Tensor, Tensor]:
    return reparam_kl_fwd(*_dense(q_mu, q_logvar, p_mu, p_logvar, eps), min_logvar)


@kernel_op("reparam_kl_bwd")
def reparam_kl_bwd_op(q_mu: Tensor, q_logvar: Tensor, p_mu: Tensor, p_logvar: Tensor,
                      eps: Tensor, grad_z: Tensor | None, grad_kl: Tensor | None,
                      min_logvar: float, need_eps: bool
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (q_mu, q_logvar, p_mu, p_logvar, eps); the last is empty unless
    ``need_eps``."""
    *grads, d_eps = reparam_kl_bwd(*_dense(q_mu, q_logvar, p_mu, p_logvar, eps), grad_z,
                                   grad_kl, min_logvar, need_eps=need_eps)
    return (*grads, d_eps if d_eps is not None else q_mu.new_empty(0))


@kernel_op("reparam_sample")
def reparam_sample_op(p_mu: Tensor, p_logvar: Tensor, eps: Tensor, min_logvar: float,
                      temperature: float) -> Tensor:
    return reparam_sample_fwd(*_dense(p_mu, p_logvar, eps), min_logvar, temperature)


@kernel_op("reparam_sample_bwd")
def reparam_sample_bwd_op(p_logvar: Tensor, eps: Tensor, grad_z: Tensor, min_logvar: float,
                          temperature: float, need_eps: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. (p_logvar, eps); the second is empty unless ``need_eps``."""
    d_plv, d_eps = reparam_sample_bwd(*_dense(p_logvar, eps), grad_z, min_logvar, temperature,
                                      need_eps)
    return d_plv, (d_eps if d_eps is not None else d_plv.new_empty(0))


def _reparam_kl_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.min_logvar = inputs[5]
    # Unused outputs arrive as None instead of zero tensors: the kernel then skips
    # their loads (e.g. a loss that only uses kl).
    ctx.set_materialize_grads(False)


def _reparam_kl_backward(ctx, grad_z, grad_kl):
    if grad_z is None and grad_kl is None:
        return (None,) * 6
    need_eps = ctx.needs_input_grad[4]
    dqm, dqlv, dpm, dplv, deps = reparam_kl_bwd_op(*ctx.saved_tensors, grad_z, grad_kl,
                                                   ctx.min_logvar, need_eps)
    return dqm, dqlv, dpm, dplv, (deps if need_eps else None), None


def _reparam_sample_setup(ctx, inputs, output):
    _, p_logvar, eps, min_logvar, temperature = inputs
    ctx.save_for_backward(p_logvar, eps)
    ctx.min_logvar = min_logvar
    ctx.temperature = temperature


def _reparam_sample_backward(ctx, grad_z):
    p_logvar, eps = ctx.saved_tensors
    need_eps = ctx.needs_input_grad[2]
    d_plv, d_eps = reparam_sample_bwd_op(p_logvar, eps, grad_z, ctx.min_logvar,
                                         ctx.temperature, need_eps)
    return grad_z, d_plv, (d_eps if need_eps else None), None, None


reparam_kl_op.register_autograd(_reparam_kl_backward, setup_context=_reparam_kl_setup)
reparam_sample_op.register_autograd(_reparam_sample_backward, setup_context=_reparam_sample_setup)


# --------------------------------------------------------------------------- public ops
def reparam_kl(q_mu, q_logvar, p_mu, p_logvar, eps, min_logvar):
    """Clamp log-variances, draw z ~ q by reparameterization and return (z, KL(q || p)),
    with the Triton kernels.

    Args:
        q_mu, q_logvar, p_mu, p_logvar, eps: tensors of one shape (N, ...), one dtype
            (fp16/bf16/fp32/fp64) and one device. Log-variances are *unclamped*; both are
            clamped to [min_logvar, MAX_LOGVAR] here (zero gradient outside, as torch.clamp).
        min_logvar: lower clamp (float).

    Returns:
        z of the input shape, and kl of shape (N,) summed over all non-batch dims, in the
        input dtype. Differentiable w.r.t. all five tensors.
    """
    require_triton("reparam_kl", q_mu.device)
    tensors = tuple(t.contiguous() for t in (q_mu, q_logvar, p_mu, p_logvar, eps))
    _check_inputs("reparam_kl", ("q_mu", "q_logvar", "p_mu", "p_logvar", "eps"), tensors)
    return reparam_kl_op(*tensors, float(min_logvar))


def reparam_sample(p_mu, p_logvar, eps, min_logvar, temperature=1.0):
    """Draw z = p_mu + exp(clamp(p_logvar)/2) * sqrt(temperature) * eps with the Triton
    kernels. ``temperature`` scales the prior *variance*. Same shape/dtype rules as
    ``reparam_kl``; differentiable w.r.t. p_mu, p_logvar and eps."""
    require_triton("reparam_sample", p_mu.device)
    if float(temperature) < 0:
        raise ValueError(f"reparam_sample: temperature must be >= 0, got {temperature}")
    tensors = tuple(t.contiguous() for t in (p_mu, p_logvar, eps))
    _check_inputs("reparam_sample", ("p_mu", "p_logvar", "eps"), tensors)
    return reparam_sample_op(*tensors, float(min_logvar), float(temperature))
