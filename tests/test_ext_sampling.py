"""The native C++ UNet forward (csrc/unet_cpu.cpp, dvpvae/native_prior.py): the prior
sampler against the Python loop over ``DiffusionPrior.step``, the batched forward
``unet_eps`` against ``UNet.forward``, and the UNet's FiLM table both are fed with.

Tolerances. The native forward sums in other orders than oneDNN/ATen (register-blocked
convolutions, fused GroupNorm/FiLM/SiLU), so each UNet call rounds differently in float32.
After T steps (x_hat clamped to [-1, 1]) the samples of the presets agree with the Python
loop to SAMPLE_ATOL. On the heavily perturbed odd architectures, and for T = 1 (a single
UNet call whose eps_hat error the step multiplies by sigma_1 / alpha_1 ~ 33), the float32
Python loop itself strays from the float64 one by more than that, so those are checked
three-way: err_native <= 2 err_ref32 + 1e-5 against the float64 loop.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dvpvae import DVPVAE, _ext, get_config
from dvpvae import native_prior
from dvpvae.diffusion import DiffusionPrior
from dvpvae.native_prior import native_unet_unsupported_reason, native_unsupported_reason, sample_native, \
    unet_eps_native
from dvpvae.ops import get_ops
from dvpvae.unet import GROUPS, UNet

PRESETS = ("mnist", "omniglot", "cifar10", "tiny")
SAMPLE_ATOL = 5e-5

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension not built: {_ext.missing_reason()}")


def perturbed_prior(preset: str, seed: int = 0, **overrides) -> DiffusionPrior:
    """The preset's prior with random weights; zero-initialised layers (output conv,
    ResBlock output convs, attention projection) get small random values so eps_hat != 0."""
    torch.manual_seed(seed)
    prior = DiffusionPrior.from_config(get_config(preset, **overrides)).eval()
    with torch.no_grad():
        for p in prior.unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return prior


def draws(prior, n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((n,) + prior.shape, generator=g)
    eps = torch.randn((prior.T, n) + prior.shape, generator=g)
    return z.to(dtype), eps.to(dtype)


@torch.no_grad()
def reference_loop(prior, z, eps, temperature):
    """The Python loop: row k of eps at the k-th step, t = 1 first."""
    for k, i in enumerate(range(prior.T - 1, -1, -1)):
        z = prior.step(z, i, eps[k], temperature)
    return z


def assert_float32_rounding(out, ref32, ref64):
    """out's error against float64 is within twice the float32 reference's own (plus 1e-5)."""
    err_native = (out.double() - ref64).abs().max().item()
    err_ref = (ref32.double() - ref64).abs().max().item()
    assert err_native <= 2 * err_ref + 1e-5, (err_native, err_ref)


def on_one_and_two_threads(fn):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fn()
        torch.set_num_threads(2)
        return one, fn()
    finally:
        torch.set_num_threads(before)


def op_args(prior, z, eps, temperature=1.0):
    """The arguments sample_native passes to the op."""
    T = prior.T
    t = torch.tensor([(i + 1) / T for i in range(T - 1, -1, -1)])
    with torch.no_grad():
        films = prior.unet.film_table(t)
    weights = [w.detach() for w in native_prior._weights(prior.unet)]
    return [z, eps, prior.coefficients, films, weights, len(prior.unet.down), GROUPS,
            prior.unet.out_norm.eps, temperature]


@pytest.fixture(scope="module")
def priors():
    return {preset: perturbed_prior(preset) for preset in PRESETS}


# --------------------------------------------------------------------------- loop
@needs_ext
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n,temperature", [(1, 1.0), (1, 0.8), (6, 0.7), (13, 1.3)])
def test_native_matches_reference_loop(priors, one_thread, preset, n, temperature):
    prior = priors[preset]
    assert native_unsupported_reason(prior) is None
    z, eps = draws(prior, n, seed=n)
    ref = reference_loop(prior, z, eps, temperature)
    out = sample_native(prior, z, eps, temperature)
    assert out.shape == (n,) + prior.shape and out.dtype == torch.float32
    assert ref.abs().max() > 0.1  # a real sample, not a degenerate zero
    torch.testing.assert_close(out, ref, rtol=0, atol=SAMPLE_ATOL)


def odd_prior(in_ch, size, channels, num_res_blocks, T, seed=0):
    torch.manual_seed(seed)
    prior = DiffusionPrior(in_ch, size, T, -6.0, 7.0, channels, num_res_blocks, 0.0).eval()
    with torch.no_grad():
        for p in prior.unet.parameters():
            p.add_(0.1 * torch.randn_like(p))  # also moves GroupNorm affines off (1, 0)
    return prior


@needs_ext
@pytest.mark.parametrize("in_ch,size,channels,num_res_blocks", [
    (1, 1, 16, 0), (2, 3, 48, 1), (3, 9, 16, 2), (1, 10, 32, 1), (4, 17, 16, 0)])
@pytest.mark.parametrize("T", [1, 3])
def test_native_other_architectures(one_thread, in_ch, size, channels, num_res_blocks, T):
    # Shapes the presets do not reach: 1x1 and odd sizes, rows longer than the kernel's
    # 8-pixel blocks, 3 vectors of channels, in_ch that is not 1 or 3, no down blocks.
    # T = 1 is a single UNet call; T = 3 runs the loop.
    prior = odd_prior(in_ch, size, channels, num_res_blocks, T)
    assert native_unsupported_reason(prior) is None
    z, eps = draws(prior, 3, seed=T)
    ref = reference_loop(prior, z, eps, 0.9)
    out = sample_native(prior, z, eps, 0.9)
    ref64 = reference_loop(odd_prior(in_ch, size, channels, num_res_blocks, T).double(), z.double(),
                           eps.double(), 0.9)
    assert_float32_rounding(out, ref, ref64)


@needs_ext
def test_native_independent_of_thread_count(priors):
    # Each sample runs its whole chain on one thread: the split cannot change any value.
    prior = priors["omniglot"]
    z, eps = draws(prior, 7, seed=2)
    one, two = on_one_and_two_threads(lambda: sample_native(prior, z, eps, 0.8))
    assert torch.equal(one, two)
    assert torch.equal(one[2:3], sample_native(prior, z[2:3], eps[:, 2:3], 0.8))


@needs_ext
def test_native_reads_current_weights(one_thread):
    # Training changes the weights between samples: every call must use the current ones.
    prior = perturbed_prior("mnist", seed=3)
    z, eps = draws(prior, 4, seed=0)
    before = sample_native(prior, z, eps, 1.0)
    with torch.no_grad():
        for p in prior.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = sample_native(prior, z, eps, 1.0)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference_loop(prior, z, eps, 1.0), rtol=0, atol=SAMPLE_ATOL)


@needs_ext
def test_native_accepts_non_contiguous_draws(priors):
    prior = priors["tiny"]
    z, eps = draws(prior, 3, seed=4)
    zt, epst = z.transpose(2, 3).contiguous().transpose(2, 3), eps.transpose(0, 1).contiguous().transpose(0, 1)
    assert not zt.is_contiguous() and not epst.is_contiguous()
    assert torch.equal(sample_native(prior, zt, epst, 0.9), sample_native(prior, z, eps, 0.9))


# --------------------------------------------------------------------------- FiLM table
@pytest.mark.parametrize("preset", ["tiny", "omniglot"])
def test_film_table_matches_forward(priors, preset):
    # The rows of the table are the (1 + scale, shift) each time block applies inside
    # UNet.forward at that t, in the order the forward calls the blocks.
    prior = priors[preset]
    unet, T = prior.unet, prior.T
    t = torch.tensor([(i + 1) / T for i in range(T - 1, -1, -1)])
    with torch.no_grad():
        films = unet.film_table(t)
    blocks = unet.time_blocks()
    C = unet.channels
    assert films.shape == (T, len(blocks), 2, C) and films.dtype == torch.float32
    seen = []
    hooks = [b.film.register_forward_hook(lambda m, inp, out, j=j: seen.append((j, out)))
             for j, b in enumerate(blocks)]
    try:
        z = torch.randn((3,) + prior.shape)
        for k, i in enumerate(range(T - 1, -1, -1)):
            seen.clear()
            with torch.no_grad():
                unet(z, torch.full((3,), (i + 1) / T))
            assert [j for j, _ in seen] == list(range(len(blocks)))  # forward order
            for j, out in seen:
                want = torch.stack([1 + out[:, :C], out[:, C:]], dim=1)  # (3, 2, C)
                torch.testing.assert_close(films[k, j].expand_as(want), want, rtol=1e-6, atol=1e-6)
    finally:
        for h in hooks:
            h.remove()


def test_time_block_forward_unchanged():
    # TimeResBlock.forward takes its FiLM from film_params: bit for bit the previous inline form.
    unet = perturbed_prior("tiny").unet
    b = unet.up[0]
    x = torch.randn(2, 2 * unet.channels, 5, 5)
    emb = torch.randn(2, unet.channels)
    with torch.no_grad():
        scale, shift = b.film(F.silu(emb))[..., None, None].chunk(2, dim=1)
        h = F.silu(b.norm_out(b.conv_in(F.silu(b.norm_in(x)))) * (1 + scale) + shift)
        want = b.skip(x) + b.conv_out(h)
        assert torch.equal(b(x, emb), want)


def test_weight_order():
    # input_conv; per time block in forward order norm_in, conv_in, norm_out, conv_out,
    # skip if any; mid_attn between mid1 and mid2; out_norm, out_conv. No time_embed, no film.
    unet = UNet(1, 16, 1, 0.0)
    names = {id(p): k for k, p in unet.named_parameters()}
    got = [names[id(w)] for w in native_prior._weights(unet)]

    def wb(*layers):
        return [f"{m}.{k}" for m in layers for k in ("weight", "bias")]

    def block(b, skip=False):
        return wb(*(f"{b}.{m}" for m in ("norm_in", "conv_in", "norm_out", "conv_out") + (("skip",) if skip else ())))

    want = (wb("input_conv") + block("down.0") + block("mid1") + wb("mid_attn.norm", "mid_attn.qkv", "mid_attn.proj")
            + block("mid2") + block("up.0", True) + block("up.1", True) + wb("out_norm", "out_conv"))
    assert got == want
    assert set(names.values()) - set(got) == {k for k in names.values() if k.startswith("time_embed.")
                                               or ".film." in k}


# --------------------------------------------------------------------------- support
class _ShiftedUNet(UNet):
    def forward(self, z, t, keep=None):
        return super().forward(z, t, keep) + 1.0


@needs_ext
def test_unsupported_priors_give_reasons(monkeypatch):
    prior = perturbed_prior("tiny")
    z, eps = draws(prior, 2, seed=0)
    cases = {}
    cases["float64"] = perturbed_prior("tiny").double()
    sub = perturbed_prior("tiny")
    sub.unet.__class__ = _ShiftedUNet
    cases["_ShiftedUNet"] = sub
    groups = perturbed_prior("tiny")
    groups.unet.mid1.norm_out.num_groups = 8
    cases[f"{GROUPS} groups"] = groups
    eps_mixed = perturbed_prior("tiny")
    eps_mixed.unet.out_norm.eps = 1e-6
    cases["one eps"] = eps_mixed
    dropout = perturbed_prior("omniglot").train()  # unet_dropout = 0.05
    cases["training mode with dropout"] = dropout
    param64 = perturbed_prior("tiny")
    param64.unet.mid2.conv_in.double()
    cases["unet.mid2.conv_in.weight is torch.float64"] = param64
    for expected, p in cases.items():
        reason = native_unsupported_reason(p)
        assert reason is not None and expected in reason, (expected, reason)
        with pytest.raises(RuntimeError, match="does not serve this prior: .*" + expected):
            sample_native(p, z.to(p.coefficients.dtype), eps.to(p.coefficients.dtype), 1.0)
    # Training mode alone is fine when there is no dropout to apply.
    assert native_unsupported_reason(perturbed_prior("tiny").train()) is None
    monkeypatch.setattr(_ext, "available", lambda: False)
    monkeypatch.setattr(_ext, "missing_reason", lambda: "dvpvae._C is not built (test)")
    monkeypatch.setattr(native_prior, "_MISSING_OPS", native_prior._missing_ops_reason())  # as at import
    assert native_unsupported_reason(prior) == "dvpvae._C is not built (test)"
    with pytest.raises(RuntimeError, match=r"not built \(test\)"):
        sample_native(prior, z, eps, 1.0)


def test_extension_status():
    assert _ext.available() == (_ext.missing_reason() is None)
    if not _ext.available():
        assert "pip install --no-build-isolation -e ." in _ext.missing_reason()


# --------------------------------------------------------------------------- one forward
def rows(prior, n: int, seed: int):
    """n inputs z and their times t, one t per row as in the NLL's trajectory batch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + prior.shape, generator=g), torch.rand(n, generator=g)


def check_unet_eps(prior, n: int, seed: int):
    z, t = rows(prior, n, seed)
    with torch.no_grad():
        ref = prior.unet(z, t)
        ref64 = copy.deepcopy(prior.unet).double()(z.double(), t.double())
    out = unet_eps_native(prior.unet, z, t)
    assert out.shape == z.shape and out.dtype == torch.float32
    assert ref.abs().max() > 0.05  # a real prediction, not a degenerate zero
    assert_float32_rounding(out, ref, ref64)


@needs_ext
@pytest.mark.parametrize("preset", PRESETS)
def test_unet_eps_matches_forward(priors, one_thread, preset):
    check_unet_eps(priors[preset], 37, seed=2)  # 37: the op's 16-row thread grain does not divide it


@needs_ext
@pytest.mark.parametrize("in_ch,size,channels,num_res_blocks", [(1, 1, 16, 0), (2, 3, 48, 1), (4, 17, 16, 0)])
def test_unet_eps_other_architectures(one_thread, in_ch, size, channels, num_res_blocks):
    check_unet_eps(odd_prior(in_ch, size, channels, num_res_blocks, T=2), 5, seed=3)


@needs_ext
@pytest.mark.parametrize("in_ch,hw,channels,num_res_blocks", [
    (1, (3, 2), 16, 1), (3, (8, 5), 32, 0), (2, (1, 7), 48, 2), (1, (6, 11), 16, 0)])
def test_unet_eps_non_square(one_thread, in_ch, hw, channels, num_res_blocks):
    # Rows and columns that F(2x2, 3x3)'s tiles cover differently (one ends in a partial tile,
    # the other does not), as the square pseudoinputs never are.
    unet = odd_prior(in_ch, 1, channels, num_res_blocks, T=2).unet
    g = torch.Generator().manual_seed(4)
    z, t = torch.randn((5, in_ch) + hw, generator=g), torch.rand(5, generator=g)
    with torch.no_grad():
        ref = unet(z, t)
        ref64 = copy.deepcopy(unet).double()(z.double(), t.double())
    out = unet_eps_native(unet, z, t)
    assert out.shape == z.shape and ref.abs().max() > 0.05
    assert_float32_rounding(out, ref, ref64)


@needs_ext
def test_unet_eps_independent_of_thread_count(priors):
    prior = priors["mnist"]
    z, t = rows(prior, 50, seed=4)
    one, two = on_one_and_two_threads(lambda: unet_eps_native(prior.unet, z, t))
    assert torch.equal(one, two)


@needs_ext
def test_cpu_provider_unet_eps(priors, one_thread):
    # Without gradients the cpu provider runs the native forward, also inside compiled code;
    # with gradients or with the extension off it runs the module, so autograd still works.
    prior, cpu = priors["tiny"], get_ops("cpu")
    z, t = rows(prior, 6, seed=5)
    with torch.no_grad():
        native = unet_eps_native(prior.unet, z, t)
        assert torch.equal(cpu.unet_eps(prior.unet, z, t), native)
        compiled = torch.compile(lambda z, t: cpu.unet_eps(prior.unet, z, t) * 2, backend="aot_eager")
        assert torch.equal(compiled(z, t), 2 * native)
        torch.testing.assert_close(get_ops("cpu", extension=False).unet_eps(prior.unet, z, t), native,
                                   rtol=0, atol=1e-5)
    out = cpu.unet_eps(prior.unet, z, t)
    assert out.requires_grad
    out.sum().backward()
    assert prior.unet.input_conv.weight.grad is not None
    prior.unet.zero_grad(set_to_none=True)
    z64 = z.double()
    with torch.no_grad():
        assert "its input is torch.float64" in native_unet_unsupported_reason(prior.unet, z64)
        with pytest.raises(RuntimeError, match="does not serve this UNet: .*its input is torch.float64"):
            unet_eps_native(prior.unet, z64, t)


@needs_ext
def test_cpu_provider_bounds_use_native_forward(monkeypatch, one_thread):
    # The evaluation bound (T UNet calls per image) and the NLL's trajectories run the native
    # forward; the training step, which needs gradients, runs the module.
    calls = []
    native_call = native_prior._unet_eps

    def counted(unet, z, t):
        calls.append(z.shape[0])
        return native_call(unet, z, t)

    monkeypatch.setattr(native_prior, "_unet_eps", counted)
    torch.manual_seed(0)
    model = DVPVAE("tiny", ops="cpu")
    x = torch.rand(3, 1, 28, 28).round()
    T = model.config.diffusion_steps
    model.train()
    model(x).loss.backward()
    assert calls == []
    model.eval()
    with torch.no_grad():
        model(x)
    assert calls == [T * 3]
    model.estimate_nll(x, 2)
    assert calls == [T * 3, T * 3 * 2]


# --------------------------------------------------------------------------- op
@needs_ext
def test_unet_eps_bad_args(priors):
    prior = priors["mnist"]  # channels 16, num_res_blocks 2
    z, t = rows(prior, 4, seed=0)
    with torch.no_grad():
        films = prior.unet.film_table(t)
    weights = [w.detach() for w in native_prior._weights(prior.unet)]
    op = torch.ops.dvpvae.unet_eps
    bad = [
        ((z[0], films), r"z must be \(N, C, H, W\)"),
        ((z.double(), films), "z must be float32"),
        ((z, films.double()), "films must be float32"),
        ((z, films.transpose(0, 1).contiguous().transpose(0, 1)), "films must be contiguous"),
        ((z, films[1:]), r"films must have shape \[4, 7, 2, 16\] = \(N, 2 num_res_blocks \+ 3, 2, C\), got \[3"),
        ((z.transpose(2, 3), films), "z must be contiguous"),
        ((torch.randn(4, 3, 7, 7), films), r"dvpvae.unet_eps: weights\[0\] must have shape \[16, 3, 3, 3\]"),
    ]
    for (zz, ff), message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(zz, ff, weights, 2, GROUPS, 1e-5)
    with pytest.raises(RuntimeError, match="dvpvae.unet_eps: got 73 weight tensors, too few"):
        op(z, films, weights[:-1], 2, GROUPS, 1e-5)
    args = [z, films, weights, 2, GROUPS, prior.unet.out_norm.eps]
    torch.library.opcheck(op.default, args)
    compiled = torch.compile(lambda z: op(z, *args[1:]).tanh(), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), op(*args).tanh())


@needs_ext
def test_op_bad_args(priors):
    prior = priors["mnist"]  # channels 16, num_res_blocks 2
    z, eps = draws(prior, 4, seed=0)
    args = op_args(prior, z, eps)
    op = torch.ops.dvpvae.ddpm_sample_unet

    def call(**changes):
        names = ["z_T", "noise", "coef", "films", "weights", "num_res_blocks", "groups", "eps", "temperature"]
        a = list(args)
        for k, v in changes.items():
            a[names.index(k)] = v
        return op(*a)

    weights = args[4]

    def with_weight(j, w):
        return weights[:j] + [w] + weights[j + 1:]

    bad = [
        (dict(noise=eps[:, :3].contiguous()), r"noise must have shape \[25, 4, 1, 7, 7\]"),
        (dict(z_T=z[0]), r"z_T must be \(N, C, H, W\)"),
        (dict(z_T=z.double(), noise=eps.double()), "must be float32"),
        (dict(coef=prior.coefficients.double()), "must be float32"),
        (dict(films=args[3].double()), "must be float32"),
        (dict(coef=prior.coefficients[:, :4].contiguous()), r"\(T, 5\) table"),
        (dict(coef=prior.coefficients[:0], noise=eps[:0]), r"\(T, 5\) table with T >= 1"),
        (dict(films=args[3][1:]), r"films must have shape \[25, 7, 2, 16\]"),
        (dict(num_res_blocks=3), r"films must have shape \[25, 9, 2, 16\]"),
        (dict(num_res_blocks=-1), "num_res_blocks must be >= 0"),
        (dict(groups=5), "not divisible into 5 groups"),
        (dict(z_T=z.transpose(2, 3)), "z_T must be contiguous"),
        (dict(films=args[3].transpose(0, 1).contiguous().transpose(0, 1)), "films must be contiguous"),
        (dict(coef=prior.coefficients.to("meta")), "coef must be on cpu"),
        (dict(weights=with_weight(4, torch.zeros(16, 16, 3))), r"weights\[4\] must have shape \[16, 16, 3, 3\], got \[16, 16, 3\]"),
        (dict(weights=with_weight(5, torch.zeros(15))), r"weights\[5\] must have shape \[16\], got \[15\]"),
        (dict(weights=with_weight(3, weights[3].double())), r"weights\[3\] must be a contiguous float32 CPU tensor"),
        (dict(weights=with_weight(0, weights[0].transpose(2, 3))), r"weights\[0\] must be a contiguous float32 CPU tensor"),
        (dict(weights=weights[:-1]), r"too few for num_res_blocks = 2"),
        (dict(weights=weights + [weights[-1]]), r"got 75 weight tensors, the UNet with num_res_blocks = 2 has 74"),
        (dict(weights=[]), r"weights\[0\] must be the input convolution's weight"),
        (dict(z_T=torch.randn(4, 3, 7, 7), noise=torch.randn(25, 4, 3, 7, 7)),
         r"weights\[0\] must have shape \[16, 3, 3, 3\], got \[16, 1, 3, 3\]"),
    ]
    assert len(weights) == 74
    for changes, message in bad:
        with pytest.raises(RuntimeError, match=message):
            call(**changes)


@needs_ext
def test_op_check_and_torch_compile(priors):
    prior = priors["tiny"]
    z, eps = draws(prior, 3, seed=1)
    args = op_args(prior, z, eps, 0.8)
    torch.library.opcheck(torch.ops.dvpvae.ddpm_sample_unet.default, args)

    def f(z, e):
        return torch.ops.dvpvae.ddpm_sample_unet(z, e, *args[2:]).tanh()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # fake tensors, no graph break
    torch.testing.assert_close(compiled(z, eps), f(z, eps))
