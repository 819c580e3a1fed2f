"""One ancestral sampling step of the diffusion prior over the pseudoinputs.

For the step t = (i+1)/T -> s = i/T (row i of the coefficient table):

    x_hat = clamp((z_t - sigma_t * eps_hat) / alpha_t, -1, 1)
    z_s   = c_z * z_t + c_x * x_hat + temperature * c_noise * noise

    c_z     = a_ts sigma_s^2 / sigma_t^2           a_ts       = alpha_t / alpha_s
    c_x     = alpha_s sigma_ts^2 / sigma_t^2        sigma_ts^2 = sigma_t^2 - a_ts^2 sigma_s^2
    c_noise = sqrt(sigma_ts^2 sigma_s^2 / sigma_t^2)
    alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma), gamma(t) = gamma_min + (gamma_max - gamma_min) t

``ddpm_coefficients`` is the one home of the (T, 5) coefficient table, columns
[sigma_t, 1/alpha_t, c_z, c_x, c_noise], computed in float64 with the cancellation-free
form sigma_ts^2 / sigma_t^2 = -expm1(gamma_s - gamma_t).

The Triton kernel reads z_t, eps_hat and noise once, writes z_s once and reads its five
coefficients from the table in device memory. The step is a Python int (a kernel argument
excluded from integer specialisation, so the T steps share one compiled kernel) or a 0-dim
int tensor on the device, read inside the kernel so that a captured T-step loop never
synchronises with the host; such a step cannot be range-checked without a sync, so the
kernel clamps it into [0, T-1]. Accumulation is fp32 (fp64 for fp64 inputs). The backward
(w.r.t. z_t, eps_hat, noise; the clamp passes gradient on [-1, 1] like torch.clamp) is
provided, though sampling runs under no_grad.

Ops (torch.library.triton_op): dvpvae_kernels::ddpm_step and its backward ddpm_step_bwd. The
step reaches them as ``step_tensor`` (the 0-dim tensor, or None) and ``step`` (the int).
"""
from __future__ import annotations

import torch

from ._elementwise_common import acc_dtype, check_matching, flat_config
from ._triton import kernel_op, launch, require_triton, tl, triton

NUM_COLS = 5  # columns of the coefficient table


def ddpm_coefficients(T, gamma_min, gamma_max, dtype=torch.float32, device="cpu"):
    """Tabulate the step coefficients: a (T, 5) tensor, row i for t = (i+1)/T -> s = i/T.

    Columns: [sigma_t, 1/alpha_t, c_z, c_x, c_noise]. Computed in float64, then cast to
    ``dtype`` on ``device``.
    """
    T = int(T)
    if T < 1:
        raise ValueError(f"ddpm_coefficients: T must be >= 1, got {T}")
    if not gamma_min < gamma_max:
        raise ValueError(f"ddpm_coefficients: need gamma_min < gamma_max, got {gamma_min}, {gamma_max}")
    i = torch.arange(T, dtype=torch.float64)
    t = (i + 1) / T
    s = i / T
    g_t = gamma_min + (gamma_max - gamma_min) * t
    g_s = gamma_min + (gamma_max - gamma_min) * s
    # sigmoid(-g) = exp(-softplus(g)) keeps alpha accurate when gamma is large.
    alpha_t = torch.exp(-0.5 * torch.nn.functional.softplus(g_t))
    alpha_s = torch.exp(-0.5 * torch.nn.functional.softplus(g_s))
    sigma_t = torch.sqrt(torch.sigmoid(g_t))
    sigma2_s = torch.sigmoid(g_s)
    ratio = -torch.expm1(g_s - g_t)  # sigma_ts^2 / sigma_t^2, without the cancellation
    table = torch.stack([
        sigma_t,
        1.0 / alpha_t,
        (1.0 - ratio) * alpha_s / alpha_t,  # a_ts sigma_s^2 / sigma_t^2
        alpha_s * ratio,                    # alpha_s sigma_ts^2 / sigma_t^2
        torch.sqrt(ratio * sigma2_s),       # sqrt(sigma_ts^2 sigma_s^2 / sigma_t^2)
    ], dim=1)
    return table.to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- reference
def _row(coef, step):
    if isinstance(step, torch.Tensor):
        # index_select instead of coef[step]: no host sync, works under graph capture.
        return torch.index_select(coef, 0, step.reshape(1).to(coef.device, torch.long))[0]
    return coef[step]


def ddpm_step_ref(z_t, eps_hat, noise, coef, step, temperature=1.0):
    """Plain-PyTorch reference; same signature and semantics as ``ddpm_step``."""
    row = _row(coef, step).to(z_t.dtype)
    sigma_t, inv_alpha_t, c_z, c_x, c_noise = row.unbind(0)
    x_hat = torch.clamp((z_t - sigma_t * eps_hat) * inv_alpha_t, -1.0, 1.0)
    return c_z * z_t + c_x * x_hat + (float(temperature) * c_noise) * noise


# --------------------------------------------------------------------------- kernels
if triton is not None:

    @triton.jit(do_not_specialize=["step"])
    def _ddpm_step_fwd_kernel(zt_ptr, eh_ptr, nz_ptr, coef_ptr, step_ptr, out_ptr, numel, step,
                              T, temperature, BLOCK: tl.constexpr, ACC: tl.constexpr,
                              STEP_IN_MEMORY: tl.constexpr):
        if STEP_IN_MEMORY:
            row = tl.load(step_ptr).to(tl.int64)
        else:
            row = tl.cast(step, tl.int64)
        row = tl.minimum(tl.maximum(row, 0), T - 1)  # never read outside the table
        cbase = coef_ptr + row * 5
        sigma_t = tl.load(cbase + 0).to(ACC)
        inv_alpha_t = tl.load(cbase + 1).to(ACC)
        c_z = tl.load(cbase + 2).to(ACC)
        c_x = tl.load(cbase + 3).to(ACC)
        c_noise = tl.load(cbase + 4).to(ACC) * tl.cast(temperature, ACC)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(ACC)
        eh = tl.load(eh_ptr + offs, mask=mask, other=0.0).to(ACC)
        nz = tl.load(nz_ptr + offs, mask=mask, other=0.0).to(ACC)
        x_hat = tl.minimum(tl.maximum((zt - sigma_t * eh) * inv_alpha_t, -1.0), 1.0)
        zs = c_z * zt + c_x * x_hat + c_noise * nz
        tl.store(out_ptr + offs, zs.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["step"])
    def _ddpm_step_bwd_kernel(zt_ptr, eh_ptr, g_ptr, coef_ptr, step_ptr, dzt_ptr, deh_ptr, dnz_ptr,
                              numel, step, T, temperature, BLOCK: tl.constexpr, ACC: tl.constexpr,
                              STEP_IN_MEMORY: tl.constexpr, NEED_NOISE: tl.constexpr):
        if STEP_IN_MEMORY:
            row = tl.load(step_ptr).to(tl.int64)
        else:
            row = tl.cast(step, tl.int64)
        row = tl.minimum(tl.maximum(row, 0), T - 1)
        cbase = coef_ptr + row * 5
        sigma_t = tl.load(cbase + 0).to(ACC)
        inv_alpha_t = tl.load(cbase + 1).to(ACC)
        c_z = tl.load(cbase + 2).to(ACC)
        c_x = tl.load(cbase + 3).to(ACC)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        zt = tl.load(zt_ptr + offs, mask=mask, other=0.0).to(ACC)
        eh = tl.load(eh_ptr + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        pre = (zt - sigma_t * eh) * inv_alpha_t
        # torch.clamp passes the gradient on the closed interval [-1, 1].
        g_pre = tl.where((pre >= -1.0) & (pre <= 1.0), g * c_x, 0.0) * inv_alpha_t
        tl.store(dzt_ptr + offs, (g * c_z + g_pre).to(dzt_ptr.dtype.element_ty), mask=mask)
        tl.store(deh_ptr + offs, (-sigma_t * g_pre).to(deh_ptr.dtype.element_ty), mask=mask)
        if NEED_NOISE:
            c_noise = tl.load(cbase + 4).to(ACC) * tl.cast(temperature, ACC)
            tl.store(dnz_ptr + offs, (g * c_noise).to(dnz_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- launchers
def _check_step(step, coef):
    """Return (step_int, step_tensor_or_None); raise ValueError on a bad step."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dim() > 1:
            raise ValueError(f"ddpm_step: a tensor step must be 0-dim (or one element), got shape "
                             f"{tuple(step.shape)}")
        if step.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ddpm_step: a tensor step must be int32/int64, got {step.dtype}")
        if step.device != coef.device:
            raise ValueError(f"ddpm_step: step is on {step.device} but coef on {coef.device}")
        return 0, step
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"ddpm_step: step must be a Python int or a 0-dim int tensor, got "
                         f"{type(step).__name__}")
    if not 0 <= step < coef.shape[0]:
        raise ValueError(f"ddpm_step: step {step} outside [0, {coef.shape[0] - 1}] "
                         f"(row i is the step t=(i+1)/T -> s=i/T)")
    return step, None


def _check_inputs(z_t, eps_hat, noise, coef):
    check_matching("ddpm_step", ("z_t", "eps_hat", "noise"), (z_t, eps_hat, noise))
    if not isinstance(coef, torch.Tensor) or coef.dim() != 2 or coef.shape[1] != NUM_COLS or coef.shape[0] < 1:
        shape = tuple(coef.shape) if isinstance(coef, torch.Tensor) else type(coef).__name__
        raise ValueError(f"ddpm_step: coef must be a (T, {NUM_COLS}) table from ddpm_coefficients, got {shape}")
    if coef.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ddpm_step: coef must be float32 or float64, got {coef.dtype}")
    if coef.device != z_t.device:
        raise ValueError(f"ddpm_step: coef is on {coef.device}, expected {z_t.device}")
    if not coef.is_contiguous():
        raise ValueError("ddpm_step: coef must be contiguous")


def ddpm_step_fwd(z_t, eps_hat, noise, coef, step, temperature=1.0):
    """Launch the forward kernel (no autograd)."""
    _check_inputs(z_t, eps_hat, noise, coef)
    step_int, step_t = _check_step(step, coef)
    out = torch.empty_like(z_t)
    numel = z_t.numel()
    if numel:
        block, grid, num_warps = flat_config(numel)
        launch(
            _ddpm_step_fwd_kernel, (grid,),
            z_t, eps_hat, noise, coef, step_t if step_t is not None else coef, out, numel,
            step_int, coef.shape[0], float(temperature), BLOCK=block,
            ACC=acc_dtype(z_t.dtype), STEP_IN_MEMORY=step_t is not None, num_warps=num_warps)
    return out


def ddpm_step_bwd(z_t, eps_hat, grad_out, coef, step, temperature=1.0, need_noise=False):
    """Launch the backward kernel; returns (d z_t, d eps_hat, d noise or None)."""
    grad_out = grad_out.contiguous()
    if grad_out.shape != z_t.shape:
        raise ValueError(f"ddpm_step backward: grad shape {tuple(grad_out.shape)} != {tuple(z_t.shape)}")
    step_int, step_t = _check_step(step, coef)
    d_zt = torch.empty_like(z_t)
    d_eh = torch.empty_like(z_t)
    d_nz = torch.empty_like(z_t) if need_noise else None
    numel = z_t.numel()
    if numel:
        block, grid, num_warps = flat_config(numel)
        launch(
            _ddpm_step_bwd_kernel, (grid,),
            z_t, eps_hat, grad_out, coef, step_t if step_t is not None else coef,
            d_zt, d_eh, d_nz if need_noise else d_zt, numel, step_int, coef.shape[0],
            float(temperature), BLOCK=block, ACC=acc_dtype(z_t.dtype),
            STEP_IN_MEMORY=step_t is not None, NEED_NOISE=need_noise, num_warps=num_warps)
    return d_zt, d_eh, d_nz


# --------------------------------------------------------------------------- ops
Tensor = torch.Tensor


def _dense(*tensors):
    # The kernels index the tensors as flat contiguous arrays; the ops take any strides, as
    # a compiler may hand saved tensors over in another layout.
    return tuple(t.contiguous() for t in tensors)


@kernel_op("ddpm_step")
def ddpm_step_op(z_t: Tensor, eps_hat: Tensor, noise: Tensor, coef: Tensor,
                 step_tensor: Tensor | None, step: int, temperature: float) -> Tensor:
    """``ddpm_step`` at row ``step_tensor`` if given, else at row ``step``."""
    return ddpm_step_fwd(*_dense(z_t, eps_hat, noise, coef),
                         step_tensor if step_tensor is not None else step, temperature)


@kernel_op("ddpm_step_bwd")
def ddpm_step_bwd_op(z_t: Tensor, eps_hat: Tensor, grad_out: Tensor, coef: Tensor,
                     step_tensor: Tensor | None, step: int, temperature: float,
                     need_noise: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients w.r.t. (z_t, eps_hat, noise); the last is empty unless ``need_noise``."""
    z_t, eps_hat, coef = _dense(z_t, eps_hat, coef)
    d_zt, d_eh, d_nz = ddpm_step_bwd(z_t, eps_hat, grad_out, coef,
                                     step_tensor if step_tensor is not None else step,
                                     temperature, need_noise)
    return d_zt, d_eh, (d_nz if d_nz is not None else d_zt.new_empty(0))


def _ddpm_step_setup(ctx, inputs, output):
    z_t, eps_hat, _, coef, step_tensor, step, temperature = inputs
    ctx.save_for_backward(z_t, eps_hat, coef, step_tensor)
    ctx.step, ctx.temperature = step, temperature


def _ddpm_step_backward(ctx, grad_out):
    z_t, eps_hat, coef, step_tensor = ctx.saved_tensors
    need_noise = ctx.needs_input_grad[2]
    d_zt, d_eh, d_nz = ddpm_step_bwd_op(z_t, eps_hat, grad_out, coef, step_tensor, ctx.step,
                                        ctx.temperature, need_noise)
    return d_zt, d_eh, (d_nz if need_noise else None), None, None, None, None


ddpm_step_op.register_autograd(_ddpm_step_backward, setup_context=_ddpm_step_setup)


# --------------------------------------------------------------------------- public op
def ddpm_step(z_t, eps_hat, noise, coef, step, temperature=1.0):
    """One ancestral step z_t -> z_s of the diffusion prior, with the Triton kernel.

    Args:
        z_t, eps_hat, noise: tensors of one shape (the op is elementwise), one dtype
            (fp16/bf16/fp32/fp64) and one device. ``eps_hat`` is the network's noise
            prediction at t, ``noise`` a fresh N(0, I) draw.
        coef: the (T, 5) table of ``ddpm_coefficients`` on the same device (fp32/fp64).
        step: row index i in [0, T-1] for t = (i+1)/T -> s = i/T; a Python int or a 0-dim
            int32/int64 tensor on the table's device. Ancestral sampling runs
            i = T-1, ..., 0 starting from z ~ N(0, I).
        temperature: multiplies the noise standard deviation.

    Returns:
        z_s, same shape and dtype as z_t. Differentiable w.r.t. z_t, eps_hat and noise.
    """
    require_triton("ddpm_step", z_t.device)
    z_t, eps_hat, noise = z_t.contiguous(), eps_hat.contiguous(), noise.contiguous()
    _check_inputs(z_t, eps_hat, noise, coef)
    step_int, step_t = _check_step(step, coef)
    return ddpm_step_op(z_t, eps_hat, noise, coef, step_t, step_int, float(temperature))
