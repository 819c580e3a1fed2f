"""FastDVPVAE(precision="bf16"): bfloat16 convolutions and matmuls, float32 densities.

Tolerance. bfloat16 keeps 8 significant bits (unit roundoff 2**-9). Each convolution's
output is rounded once; the loss, KL and -log p(x|z) sum many such values, so their error
is a few unit roundoffs of their size. Two bounds, both against a float64 oracle:
* three-way: the error is at most twice that of the reference model run under plain
  ``torch.autocast`` (the same-dtype reference) plus 2**-9 of the quantity's size;
* absolute: the loss within 2**-7 (0.8%) of its float64 value.
"""
import copy
import warnings

import pytest
import torch

import dvpvae.fast
from dvpvae import FastDVPVAE, Noise
from dvpvae.gpucheck import perturbed_model
from dvpvae.ops import Bf16Ops

BF16_ROUNDOFF = 2.0 ** -9
LOSS_RTOL = 2.0 ** -7


def run(model, x, draws, training, autocast=False):
    model.train(training)
    model.zero_grad()
    with torch.set_grad_enabled(training), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = model(x, Noise(draws))
    if training:
        out.loss.backward()
    return out, {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny():
    ref, x = perturbed_model("tiny", seed=1)
    return ref, x[:4]


@pytest.mark.parametrize("training,compile", [(True, False), (False, False), (False, True),
                                               pytest.param(True, True, marks=pytest.mark.slow)])
def test_bf16_matches_float64_within_the_autocast_reference_error(tiny, training, compile):
    ref, x = tiny
    recorded = Noise(generator=torch.Generator().manual_seed(3), record=True)
    ref.train(training)
    with torch.no_grad():
        ref(x, recorded)
    draws = recorded.recorded
    o64, g64 = run(copy.deepcopy(ref).double(), x.double(), {k: v.double() for k, v in draws.items()}, training)
    o_ac, g_ac = run(ref, x, draws, training, autocast=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no native bfloat16 on this CPU
        bf16, g_bf16 = run(FastDVPVAE.from_reference(ref, compile=compile, precision="bf16"), x, draws, training)
    for name in ("loss", "rec", "kl"):
        assert getattr(bf16, name).dtype == torch.float32, name
    assert abs(bf16.loss.item() - o64.loss.item()) <= LOSS_RTOL * abs(o64.loss.item())
    grad_scale = max((float(g.abs().max()) for g in g64.values()), default=0.0)
    pairs = [(n, getattr(o64, n), getattr(o_ac, n), getattr(bf16, n), float(getattr(o64, n).abs().max()))
             for n in ("loss", "rec", "kl")]
    pairs += [(k, g64[k], g_ac[k], g_bf16[k], grad_scale) for k in g64]
    assert g_bf16.keys() == g64.keys()
    for name, exact, autocast, ours, scale in pairs:
        err_ac = float((autocast.double() - exact).abs().max())
        err = float((ours.double() - exact).abs().max())
        assert err <= 2 * err_ac + BF16_ROUNDOFF * scale, f"{name}: bf16 {err:.3g} vs autocast reference {err_ac:.3g}"


def test_bf16_keeps_float32_master_weights_and_gradients(tiny):
    ref, x = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fast = FastDVPVAE.from_reference(ref, share=False, compile=False, precision="bf16")
        fast.train()
        fast(x).loss.backward()
    assert all(p.dtype == torch.float32 for p in fast.parameters())
    assert all(p.grad.dtype == torch.float32 for p in fast.parameters() if p.grad is not None)
    assert isinstance(fast.ops_for(x.device), Bf16Ops)


def test_invalid_precision_and_float32_only_provider_raise():
    with pytest.raises(ValueError, match="precision"):
        FastDVPVAE("tiny", precision="fp16")
    with pytest.raises(ValueError, match="float32 only"):
        FastDVPVAE("tiny", ops="triton", precision="bf16")


def test_bf16_warns_once_without_native_support(tiny, monkeypatch):
    ref, x = tiny
    monkeypatch.setattr(dvpvae.fast, "native_bf16_reason", lambda device: "no bfloat16 units")
    fast = FastDVPVAE.from_reference(ref, compile=False, precision="bf16")
    fast.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            fast(x)
            fast(x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "no bfloat16 units" in msgs[0]
    plain = FastDVPVAE.from_reference(ref, compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            plain.eval()(x)


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_cli_precision_needs_the_fast_model(module, tmp_path):
    import importlib

    cli = importlib.import_module(f"dvpvae.{module}")
    argv = ["--preset", "tiny", "--out", str(tmp_path)] if module == "train" else [str(tmp_path)]
    with pytest.raises(SystemExit, match="--precision bf16 needs --model fast"):
        cli.main(argv + ["--precision", "bf16"])


def test_bf16_no_gradient_unet_calls_are_the_native_float32_forward(tiny):
    from dvpvae.diffusion import DiffusionPrior
    from dvpvae.native_prior import native_unet_unsupported_reason
    from dvpvae.ops import CpuOps

    prior = next(m for m in tiny[0].modules() if isinstance(m, DiffusionPrior)).eval()
    reason = native_unet_unsupported_reason(prior.unet)
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(5)
    z, t = torch.randn((3,) + prior.shape, generator=g), torch.randint(0, prior.T, (3,), generator=g)
    with torch.no_grad():
        exact = prior.unet(z, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = CpuOps().unet_eps(prior.unet, z, t)
    # float32 throughout (FiLM table included), far inside bfloat16's 2**-9
    assert native.dtype == torch.float32 and torch.allclose(native, exact, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module = CpuOps().unet_eps(prior.unet, z, t)  # with gradients: the module, in bfloat16
    assert module.dtype == torch.bfloat16
