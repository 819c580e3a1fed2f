"""reparam_kl / reparam_sample: Triton kernels (interpreter on CPU) against the reference.

Tolerances: the three-way check ``err_kernel <= 2 * err_ref_same_dtype + atol`` with
atol = REL[dtype] * (1 + max|fp64 value|) -- scaled by magnitude because kl is a sum over
up to 3072 elements. REL: fp32 1e-6, fp64 1e-12.
"""
import pytest
import torch

from dvpvae.kernels.reparam_kl import (MAX_LOGVAR, reparam_kl, reparam_kl_bwd, reparam_kl_fwd,
                                       reparam_kl_ref, reparam_sample, reparam_sample_ref)
from tests.kernels.utils import assert_three_way, assert_verbose_allclose

REL = {torch.float32: 1e-6, torch.float64: 1e-12}
DTYPES = [torch.float32, torch.float64]

# Latent shapes (N, w, h, w) the presets produce, plus odd/prime/batch-1/degenerate ones.
PRESET_SHAPES = [
    (3, 1, 7, 7),     # mnist / omniglot, coarse scale
    (2, 1, 14, 14),   # mnist / omniglot, fine scale
    (2, 3, 32, 32),   # cifar10, finest scale (start_scale_at_x)
    (2, 3, 16, 16),   # cifar10
    (2, 3, 8, 8),     # cifar10
    (2, 3, 4, 4),     # cifar10, top
]
ODD_SHAPES = [(1, 1, 7, 7), (5, 3, 5, 13), (7, 11), (1, 1, 1, 1), (2, 2, 17, 3)]
SHAPES = PRESET_SHAPES + ODD_SHAPES


def _inputs(shape, dtype, min_logvar):
    """q/p parameters with log-variances on both sides of [min_logvar, MAX_LOGVAR], a few on
    the boundaries (torch.clamp passes the gradient there)."""
    q_mu = torch.randn(shape, dtype=torch.float64)
    p_mu = torch.randn(shape, dtype=torch.float64)
    eps = torch.randn(shape, dtype=torch.float64)
    q_lv = torch.empty(shape, dtype=torch.float64).uniform_(min_logvar - 2.0, MAX_LOGVAR + 1.5)
    p_lv = torch.empty(shape, dtype=torch.float64).uniform_(min_logvar - 2.0, MAX_LOGVAR + 1.5)
    q_lv.view(-1)[::7] = min_logvar
    p_lv.view(-1)[3::11] = MAX_LOGVAR
    return [t.to(dtype) for t in (q_mu, q_lv, p_mu, p_lv, eps)]


def _leaves(ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def _atol(dtype, hi):
    return REL[dtype] * (1.0 + hi.detach().abs().max().item())


def _check_reparam_kl(shape, dtype, min_logvar):
    base = _inputs(shape, dtype, min_logvar)
    x, xr, xh = _leaves(base), _leaves(base), _leaves(base, torch.float64)
    z, kl = reparam_kl(*x, min_logvar)
    zr, klr = reparam_kl_ref(*xr, min_logvar)
    zh, klh = reparam_kl_ref(*xh, min_logvar)
    assert kl.shape == (shape[0],) and kl.dtype == dtype and z.dtype == dtype
    assert_three_way(z, zr, zh, _atol(dtype, zh), "z")
    assert_three_way(kl, klr, klh, _atol(dtype, klh), "kl")
    gz = torch.randn_like(zh)
    gk = torch.randn_like(klh)
    g = torch.autograd.grad((z, kl), x, (gz.to(dtype), gk.to(dtype)))
    gr = torch.autograd.grad((zr, klr), xr, (gz.to(dtype), gk.to(dtype)))
    gh = torch.autograd.grad((zh, klh), xh, (gz, gk))
    for name, a, b, c in zip(("q_mu", "q_logvar", "p_mu", "p_logvar", "eps"), g, gr, gh):
        assert_three_way(a, b, c, _atol(dtype, c), f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reparam_kl_matches_reference(shape, dtype):
    _check_reparam_kl(shape, dtype, min_logvar=-3.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparam_kl_paper_min_logvar(dtype):
    _check_reparam_kl((4, 1, 7, 7), dtype, min_logvar=-10.0)


@pytest.mark.parametrize("shape", [(3, 1, 7, 7), (2, 3, 32, 32), (5, 3, 5, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_kl_against_torch_distributions(shape):
    # Independent oracle: torch.distributions' closed form, on the clamped log-variances.
    min_lv = -3.0
    q_mu, q_lv, p_mu, p_lv, eps = _inputs(shape, torch.float64, min_lv)
    _, kl = reparam_kl(q_mu, q_lv, p_mu, p_lv, eps, min_lv)
    lq, lp = q_lv.clamp(min_lv, MAX_LOGVAR), p_lv.clamp(min_lv, MAX_LOGVAR)
    q = torch.distributions.Normal(q_mu, torch.exp(0.5 * lq))
    p = torch.distributions.Normal(p_mu, torch.exp(0.5 * lp))
    oracle = torch.distributions.kl_divergence(q, p).reshape(shape[0], -1).sum(1)
    assert_verbose_allclose(kl, oracle, atol=1e-10, rtol=1e-10, name="kl vs torch.distributions")
    assert (kl >= 0).all()


def test_kl_nonnegative_and_zero_when_equal():
    q_mu, q_lv, _, _, eps = _inputs((4, 3, 8, 8), torch.float32, -3.0)
    _, kl_same = reparam_kl(q_mu, q_lv, q_mu, q_lv, eps, -3.0)
    assert kl_same.abs().max() < 1e-5
    for _ in range(3):
        args = _inputs((4, 3, 8, 8), torch.float32, -3.0)
        _, kl = reparam_kl(*args, -3.0)
        assert (kl >= 0).all()


def test_clamp_boundaries_gradients():
    # Values beyond both clamp ends get exactly zero gradient; inside and on the
    # boundaries they get the full gradient (torch.clamp semantics).
    min_lv = -3.0
    lv = torch.tensor([[-5.0, -3.0, -1.0, MAX_LOGVAR, MAX_LOGVAR + 1.0]], dtype=torch.float64)
    q_mu, p_mu, eps = (torch.randn(1, 5, dtype=torch.float64) for _ in range(3))
    q_lv = lv.clone().requires_grad_(True)
    p_lv = lv.clone().requires_grad_(True)
    z, kl = reparam_kl(q_mu, q_lv, p_mu, p_lv, eps, min_lv)
    (z.sum() + kl.sum()).backward()
    assert q_lv.grad[0, 0] == 0 and q_lv.grad[0, 4] == 0
    assert p_lv.grad[0, 0] == 0 and p_lv.grad[0, 4] == 0
    assert (q_lv.grad[0, 1:4] != 0).all() and (p_lv.grad[0, 1:4] != 0).all()
    # the forward uses the clamped values
    lc = lv.clamp(min_lv, MAX_LOGVAR)
    zr, klr = reparam_kl_ref(q_mu, lc, p_mu, lc, eps, min_lv)
    assert_verbose_allclose(z, zr, 1e-12, 1e-12, "z")
    assert_verbose_allclose(kl, klr, 1e-12, 1e-12, "kl")


@pytest.mark.parametrize("use", ["kl_only", "z_only", "kl_sum"])
def test_partial_outputs_backward(use):
    # kl only / z only: the other gradient arrives as None and the kernel skips it;
    # kl.sum(): grad_kl is an expanded (stride-0) tensor.
    base = _inputs((3, 1, 7, 7), torch.float64, -3.0)
    x, xr = _leaves(base), _leaves(base)
    z, kl = reparam_kl(*x, -3.0)
    zr, klr = reparam_kl_ref(*xr, -3.0)
    if use == "kl_only":
        g_out = torch.randn_like(kl)
        g, gr = torch.autograd.grad(kl, x, g_out), torch.autograd.grad(klr, xr, g_out, allow_unused=True)
    elif use == "z_only":
        g_out = torch.randn_like(z)
        g, gr = torch.autograd.grad(z, x, g_out), torch.autograd.grad(zr, xr, g_out, allow_unused=True)
    else:
        g, gr = torch.autograd.grad(3.0 * kl.sum(), x), torch.autograd.grad(3.0 * klr.sum(), xr, allow_unused=True)
    for a, b in zip(g, gr):
        assert_verbose_allclose(a, torch.zeros_like(a) if b is None else b, 1e-12, 1e-12)


@pytest.mark.parametrize("splits", [2, 3])
def test_split_reduction_path(splits):
    # The GPU small-batch path splits D over S programs and sums S partials; force it here.
    args = _inputs((2, 3, 32, 32), torch.float64, -3.0)
    z, kl = reparam_kl_fwd(*args, -3.0, splits=splits)
    zr, klr = reparam_kl_ref(*args, -3.0)
    assert_verbose_allclose(z, zr, 1e-12, 1e-12, "z")
    assert_verbose_allclose(kl, klr, 1e-9, 1e-12, "kl")
    gz, gk = torch.randn_like(z), torch.randn_like(kl)
    one = reparam_kl_bwd(*args, gz, gk, -3.0, need_eps=True, splits=1)
    many = reparam_kl_bwd(*args, gz, gk, -3.0, need_eps=True, splits=splits)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


def test_deterministic():
    args = _inputs((3, 3, 16, 16), torch.float32, -3.0)
    z1, kl1 = reparam_kl(*args, -3.0)
    z2, kl2 = reparam_kl(*args, -3.0)
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2)


def test_non_contiguous_inputs_are_accepted_by_the_op():
    args = [t.transpose(-1, -2) for t in _inputs((2, 3, 5, 13), torch.float64, -3.0)]
    z, kl = reparam_kl(*args, -3.0)
    zr, klr = reparam_kl_ref(*args, -3.0)
    assert_verbose_allclose(z, zr, 1e-12, 1e-12, "z")
    assert_verbose_allclose(kl, klr, 1e-10, 1e-12, "kl")


# ------------------------------------------------------------------ sampling variant
@pytest.mark.parametrize("temperature", [1.0, 0.25, 0.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 7, 7), (2, 3, 32, 32), (1, 1, 14, 14), (5, 3, 5, 13)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reparam_sample_matches_reference(shape, dtype, temperature):
    _, _, p_mu, p_lv, eps = _inputs(shape, dtype, -3.0)
    base = (p_mu, p_lv, eps)
    x, xr, xh = _leaves(base), _leaves(base), _leaves(base, torch.float64)
    z = reparam_sample(*x, -3.0, temperature)
    zr = reparam_sample_ref(*xr, -3.0, temperature)
    zh = reparam_sample_ref(*xh, -3.0, temperature)
    assert_three_way(z, zr, zh, _atol(dtype, zh), "z")
    gz = torch.randn_like(zh)
    g = torch.autograd.grad(z, x, gz.to(dtype))
    gr = torch.autograd.grad(zr, xr, gz.to(dtype))
    gh = torch.autograd.grad(zh, xh, gz)
    for name, a, b, c in zip(("p_mu", "p_logvar", "eps"), g, gr, gh):
        assert_three_way(a, b, c, _atol(dtype, c), f"grad {name}")


def test_reparam_sample_temperature_scales_variance():
    # Var(z) = T * exp(lp): check the formula directly (not via the reference).
    p_mu = torch.zeros(1, 1, 7, 7, dtype=torch.float64)
    p_lv = torch.full_like(p_mu, -0.5)
    eps = torch.randn_like(p_mu)
    z = reparam_sample(p_mu, p_lv, eps, -10.0, 0.36)
    assert_verbose_allclose(z, 0.6 * torch.exp(torch.tensor(-0.25, dtype=torch.float64)) * eps,
                            1e-7, 1e-7, "z")  # 0.36 travels as fp32: ~1e-8 relative


# ------------------------------------------------------------------ validation
def test_bad_inputs_raise():
    args = _inputs((2, 1, 7, 7), torch.float32, -3.0)
    with pytest.raises(ValueError, match="shape"):
        reparam_kl(args[0], args[1][:, :, :6], *args[2:], -3.0)
    with pytest.raises(ValueError, match="dtype"):
        reparam_kl(args[0], args[1].double(), *args[2:], -3.0)
    with pytest.raises(ValueError, match="dtype"):
        ints = [torch.ones(2, 3, dtype=torch.int32)] * 5
        reparam_kl(*ints, -3.0)
    with pytest.raises(ValueError, match="contiguous"):
        reparam_kl_fwd(*[t.transpose(-1, -2) for t in args], -3.0)
    with pytest.raises(ValueError, match="torch.Tensor"):
        reparam_kl_fwd(args[0], 1.0, *args[2:], -3.0)
    with pytest.raises(ValueError, match="shape"):
        reparam_sample(args[0], args[1][:1], args[4], -3.0)
    with pytest.raises(ValueError, match="temperature"):
        reparam_sample(args[0], args[1], args[4], -3.0, -1.0)
