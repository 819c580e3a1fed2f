"""ddpm_step / ddpm_coefficients: Triton kernels (interpreter on CPU) against the reference
and against an independent float64 transcription of the step formulas.

Tolerances: three-way check with atol = REL[dtype] * (1 + max|fp64 value|);
REL: fp32 1e-6, fp64 1e-12. The coefficient table: rtol 1e-12 (both sides float64).
"""
import math

import pytest
import torch

from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step, ddpm_step_fwd, ddpm_step_ref
from tests.kernels.utils import assert_three_way, assert_verbose_allclose

# Column order of the coefficient table (part of its contract).
COL_SIGMA_T, COL_INV_ALPHA_T, COL_C_Z, COL_C_X, COL_C_NOISE = range(5)

REL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]
# (T, gamma_min, gamma_max) of the mnist, omniglot and cifar10 presets.
SCHEDULES = {"mnist": (25, -6.0, 7.0), "omniglot": (50, -6.0, 7.0), "cifar10": (25, -10.0, 7.0)}
# Pseudoinput shapes (N, C, ctx, ctx): mnist (7x7), omniglot (5x5), cifar10 (3x7x7); odd ones.
SHAPES = [(4, 1, 7, 7), (3, 1, 5, 5), (2, 3, 7, 7), (1, 1, 7, 7), (5, 3, 5, 13), (1, 1, 1, 1), (7, 11)]


def _independent_row(T, gmin, gmax, i):
    """Step t=(i+1)/T -> s=i/T straight from the formulas, in Python floats (no torch, no
    expm1/softplus rewrites as in the production table)."""
    def gamma(u):
        return gmin + (gmax - gmin) * u

    def sigmoid(v):
        return 1.0 / (1.0 + math.exp(-v))

    t, s = (i + 1) / T, i / T
    a2_t, s2_t = sigmoid(-gamma(t)), sigmoid(gamma(t))
    a2_s, s2_s = sigmoid(-gamma(s)), sigmoid(gamma(s))
    alpha_t, alpha_s = math.sqrt(a2_t), math.sqrt(a2_s)
    a_ts = alpha_t / alpha_s
    s2_ts = s2_t - a_ts ** 2 * s2_s
    return {"sigma_t": math.sqrt(s2_t), "alpha_t": alpha_t, "c_z": a_ts * s2_s / s2_t,
            "c_x": alpha_s * s2_ts / s2_t, "c_noise": math.sqrt(s2_ts * s2_s / s2_t)}


@pytest.mark.parametrize("preset", sorted(SCHEDULES) + ["T1"])
def test_coefficients_against_independent_float64(preset):
    T, gmin, gmax = SCHEDULES.get(preset, (1, -6.0, 7.0))
    table = ddpm_coefficients(T, gmin, gmax, dtype=torch.float64)
    assert table.shape == (T, 5) and table.dtype == torch.float64
    rows = [_independent_row(T, gmin, gmax, i) for i in range(T)]
    expect = torch.tensor([[r["sigma_t"], 1.0 / r["alpha_t"], r["c_z"], r["c_x"], r["c_noise"]]
                           for r in rows], dtype=torch.float64)
    # rtol 1e-9: the direct formula loses ~1e-12 relative to cancellation in sigma_ts^2.
    assert_verbose_allclose(table, expect, atol=0.0, rtol=1e-9, name="coefficient table")
    # column layout is part of the API
    assert table[0, COL_SIGMA_T] == pytest.approx(rows[0]["sigma_t"], rel=1e-12)
    assert table[-1, COL_INV_ALPHA_T] == pytest.approx(1 / rows[-1]["alpha_t"], rel=1e-12)
    assert table[3 % T, COL_C_Z] == pytest.approx(rows[3 % T]["c_z"], rel=1e-9)
    assert table[3 % T, COL_C_X] == pytest.approx(rows[3 % T]["c_x"], rel=1e-9)
    assert table[3 % T, COL_C_NOISE] == pytest.approx(rows[3 % T]["c_noise"], rel=1e-9)
    f32 = ddpm_coefficients(T, gmin, gmax)
    assert f32.dtype == torch.float32 and torch.equal(f32, table.float())


def _inputs(shape, dtype):
    return [torch.randn(shape, dtype=torch.float64).to(dtype) for _ in range(3)]


def _atol(dtype, hi):
    return REL[dtype] * (1.0 + hi.detach().abs().max().item())


def _check(shape, dtype, coef64, step, temperature):
    base = _inputs(shape, dtype)
    x = [t.clone().requires_grad_() for t in base]
    xr = [t.clone().requires_grad_() for t in base]
    xh = [t.double().requires_grad_() for t in base]
    coef = coef64.to(dtype)
    out = ddpm_step(*x, coef, step, temperature)
    ref = ddpm_step_ref(*xr, coef, step, temperature)
    hi = ddpm_step_ref(*xh, coef64, step, temperature)
    assert out.shape == shape and out.dtype == dtype
    assert_three_way(out, ref, hi, _atol(dtype, hi), "z_s")
    g = torch.randn_like(hi)
    ga = torch.autograd.grad(out, x, g.to(dtype))
    gr = torch.autograd.grad(ref, xr, g.to(dtype))
    gh = torch.autograd.grad(hi, xh, g)
    for name, a, b, c in zip(("z_t", "eps_hat", "noise"), ga, gr, gh):
        assert_three_way(a, b, c, _atol(dtype, c), f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_step_matches_reference(shape, dtype):
    coef64 = ddpm_coefficients(*SCHEDULES["mnist"], dtype=torch.float64)
    for step in (0, 11, 24):
        _check(shape, dtype, coef64, step, 1.0)


@pytest.mark.parametrize("temperature", [0.5, 0.0])
@pytest.mark.parametrize("step_kind", ["int", "tensor64", "tensor32"])
def test_step_index_kinds_and_temperature(step_kind, temperature):
    coef64 = ddpm_coefficients(*SCHEDULES["cifar10"], dtype=torch.float64)
    for i in (0, 7, 24):
        step = i if step_kind == "int" else torch.tensor(
            i, dtype=torch.int64 if step_kind == "tensor64" else torch.int32)
        _check((2, 3, 7, 7), torch.float64, coef64, step, temperature)


def test_tensor_step_equals_int_step():
    coef = ddpm_coefficients(*SCHEDULES["omniglot"])
    z, e, n = _inputs((3, 1, 5, 5), torch.float32)
    for i in (0, 31, 49):
        a = ddpm_step(z, e, n, coef, i)
        b = ddpm_step(z, e, n, coef, torch.tensor(i))
        assert torch.equal(a, b)


def test_clamp_is_exercised_and_gradient_masked():
    # At t = 1 (last row) 1/alpha_t ~ 33, so most x_hat clamp; at t = 1/T few do.
    coef = ddpm_coefficients(*SCHEDULES["mnist"], dtype=torch.float64)
    z, e, n = _inputs((4, 1, 7, 7), torch.float64)
    z.requires_grad_()
    pre = (z - coef[24, COL_SIGMA_T] * e) * coef[24, COL_INV_ALPHA_T]
    clamped = pre.abs() > 1
    assert 0 < int(clamped.sum()) < clamped.numel()
    out = ddpm_step(z, e, n, coef, 24)
    (gz,) = torch.autograd.grad(out, z, torch.ones_like(out))
    # where x_hat is clamped only the direct c_z path carries gradient
    assert torch.allclose(gz[clamped], torch.full_like(gz[clamped], coef[24, COL_C_Z].item()))
    inside = coef[24, COL_C_Z] + coef[24, COL_C_X] * coef[24, COL_INV_ALPHA_T]
    assert torch.allclose(gz[~clamped], torch.full_like(gz[~clamped], inside.item()))


@pytest.mark.parametrize("preset", ["mnist", "cifar10"])
def test_full_sampling_loop_against_independent_transcription(preset):
    # T ancestral steps with a fake denoiser eps_hat = tanh(z); the independent side uses
    # only the Python-float formulas of _independent_row, so a wrong column order, a wrong
    # step direction or a temperature on the variance instead of the std all fail here.
    T, gmin, gmax = SCHEDULES[preset]
    shape = (2, 1, 7, 7) if preset == "mnist" else (2, 3, 7, 7)
    coef = ddpm_coefficients(T, gmin, gmax, dtype=torch.float64)
    z = torch.randn(shape, dtype=torch.float64)
    noises = torch.randn((T,) + shape, dtype=torch.float64)
    temperature = 0.75
    z_k, z_i = z.clone(), z.clone()
    for i in reversed(range(T)):
        z_k = ddpm_step(z_k, torch.tanh(z_k), noises[i], coef, torch.tensor(i), temperature)
        r = _independent_row(T, gmin, gmax, i)
        x_hat = ((z_i - r["sigma_t"] * torch.tanh(z_i)) / r["alpha_t"]).clamp(-1, 1)
        z_i = r["c_z"] * z_i + r["c_x"] * x_hat + temperature * r["c_noise"] * noises[i]
    assert_verbose_allclose(z_k, z_i, atol=1e-9, rtol=1e-9, name="sample after T steps")


def test_bad_inputs_raise():
    coef = ddpm_coefficients(5, -6.0, 7.0)
    z, e, n = _inputs((2, 1, 7, 7), torch.float32)
    with pytest.raises(ValueError, match="outside"):
        ddpm_step(z, e, n, coef, 5)
    with pytest.raises(ValueError, match="outside"):
        ddpm_step(z, e, n, coef, -1)
    with pytest.raises(ValueError, match="Python int"):
        ddpm_step(z, e, n, coef, 1.0)
    with pytest.raises(ValueError, match="int32/int64"):
        ddpm_step(z, e, n, coef, torch.tensor(1.0))
    with pytest.raises(ValueError, match="0-dim"):
        ddpm_step(z, e, n, coef, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="shape"):
        ddpm_step(z, e[:1], n, coef, 1)
    with pytest.raises(ValueError, match="dtype"):
        ddpm_step(z, e.double(), n, coef, 1)
    with pytest.raises(ValueError, match=r"\(T, 5\)"):
        ddpm_step(z, e, n, coef[:, :4].contiguous(), 1)
    with pytest.raises(ValueError, match="float32 or float64"):
        ddpm_step(z, e, n, coef.half(), 1)
    with pytest.raises(ValueError, match="contiguous"):
        ddpm_step_fwd(z.transpose(-1, -2), e, n, coef, 1)
    with pytest.raises(ValueError, match="T must be"):
        ddpm_coefficients(0, -6.0, 7.0)
    with pytest.raises(ValueError, match="gamma_min"):
        ddpm_coefficients(5, 7.0, -6.0)
