"""Invariants of the reference model that can fail."""
import math

import numpy as np
import pytest
import scipy.fft
import torch

import dvpvae
from dvpvae import DVPVAE, Noise, get_config
from dvpvae.dct import dct2, dct_matrix
from dvpvae.kernels.dct_pseudoinput import dct_pseudoinput_ref, idct_pseudoinput_ref
from dvpvae.kernels.reparam_kl import reparam_kl_ref


def random_images(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 256, (n,) + cfg.image_shape, generator=g)
    return k.float() / 127.5 - 1


@pytest.mark.parametrize("size", [5, 7, 28, 32, 13])
def test_dct_matrix_is_orthonormal(size):
    d = dct_matrix(size, dtype=torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(size, dtype=torch.float64))


def idct2(coef, size):
    """Inverse of dct2 for a (possibly cropped) coefficient block."""
    dh = dct_matrix(size[0], coef.shape[-2], coef.dtype)
    dw = dct_matrix(size[1], coef.shape[-1], coef.dtype)
    return dh.T @ coef @ dw


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (3, 3, 32, 32), (1, 2, 11, 7)])
def test_dct_matches_scipy_and_inverts(shape):
    x = torch.randn(shape, dtype=torch.float64)
    ours = dct2(x)
    ref = scipy.fft.dctn(x.numpy(), type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)
    torch.testing.assert_close(idct2(ours, shape[-2:]), x)
    torch.testing.assert_close(ours.pow(2).sum((-2, -1)), x.pow(2).sum((-2, -1)))  # energy
    cropped = dct2(x, 5)
    torch.testing.assert_close(cropped, ours[..., :5, :5])
    padded = torch.zeros_like(ours)
    padded[..., :5, :5] = cropped
    np.testing.assert_allclose(idct2(cropped, shape[-2:]).numpy(),
                               scipy.fft.idctn(padded.numpy(), type=2, norm="ortho", axes=(-2, -1)), atol=1e-10)


def test_pseudoinput_round_trip_of_low_frequency_image():
    scale = torch.full((1, 7, 7), 40.0, dtype=torch.float64)
    u = torch.rand(3, 1, 7, 7, dtype=torch.float64) * 0.004
    u[:, :, 0, 0] = 0.35  # mean intensity well inside (0, 1)
    img = idct_pseudoinput_ref(u, scale, (28, 28))
    assert img.min() > -1 and img.max() < 1, "test image must not hit the clamp"
    torch.testing.assert_close(dct_pseudoinput_ref(img, scale, 7), u)


def test_analytic_kl_is_nonnegative_and_zero_at_equality():
    g = torch.Generator().manual_seed(1)
    q_mu, p_mu = torch.randn(50, 3, 4, 4, generator=g), torch.randn(50, 3, 4, 4, generator=g)
    q_lv, p_lv = torch.randn(50, 3, 4, 4, generator=g), torch.randn(50, 3, 4, 4, generator=g)
    def gaussian_kl(qm, qv, pm, pv):  # the model's KL (no clamping inside [-10, 1])
        return reparam_kl_ref(qm, qv.clamp(-10, 1), pm, pv.clamp(-10, 1), torch.zeros_like(qm), -10.0)[1]

    q_lv, p_lv = q_lv.clamp(-10, 1), p_lv.clamp(-10, 1)
    kl = gaussian_kl(q_mu, q_lv, p_mu, p_lv)
    assert bool((kl >= 0).all())
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(q_mu, (0.5 * q_lv).exp()),
                                            torch.distributions.Normal(p_mu, (0.5 * p_lv).exp()))
    torch.testing.assert_close(kl, ref.flatten(1).sum(-1), rtol=1e-5, atol=1e-5)
    assert float(gaussian_kl(q_mu, q_lv, q_mu, q_lv).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DVPVAE.from_preset("tiny")
    # Perturb every weight so that zero-initialised convs do not hide bugs.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dvpvae.set_dct_scale(model, random_images(64, model.config, seed=3))
    return model


def test_elbo_is_rec_plus_kl_and_ladder_kl_nonnegative(tiny):
    x = random_images(5, tiny.config)
    for training in (True, False):
        tiny.train(training)
        with torch.no_grad():
            out = tiny(x)
        torch.testing.assert_close(out.elbo, -(out.rec + out.kl.sum(-1)))
        assert out.kl.shape == (5, 1 + tiny.config.num_ladder_latents)
        assert bool((out.kl[:, 1:] >= 0).all())
        bpd = (out.rec.mean() + out.kl.sum(-1).mean()) / (math.log(2) * 28 * 28)
        torch.testing.assert_close(out.loss, bpd)


def test_same_noise_same_numbers_and_replay(tiny):
    tiny.train()
    x = random_images(3, tiny.config)
    rec = Noise(generator=torch.Generator().manual_seed(5), record=True)
    with torch.no_grad():
        a = tiny(x, rec)
        b = tiny(x, Noise(rec.recorded))
    torch.testing.assert_close(a.kl, b.kl, rtol=0, atol=0)
    torch.testing.assert_close(a.rec, b.rec, rtol=0, atol=0)
    assert set(rec.recorded) == {"u", "diffusion_eps0", "diffusion_t", "diffusion_eps", "binarize",
                                 *(f"z{i}" for i in range(tiny.config.num_ladder_latents))}
    with pytest.raises(ValueError, match="noise draw 'u' has shape"):
        tiny(x, {"u": torch.zeros(1, 1, 5, 5)})


@torch.no_grad()
def test_importance_sampling_estimator(tiny):
    tiny.eval()
    x = random_images(4, tiny.config)
    torch.manual_seed(11)
    # k = 1: log w is an unbiased estimate of the ELBO, so means agree within standard errors.
    n = 400
    log_w = -tiny.estimate_nll(x.repeat(n, 1, 1, 1), 1).reshape(n, 4)
    elbo = tiny(x.repeat(n, 1, 1, 1)).elbo.reshape(n, 4)
    se = ((log_w.var(0) / log_w.shape[0]) + elbo.var(0) / n).sqrt()
    assert bool(((log_w.mean(0) - elbo.mean(0)).abs() < 4.5 * se).all())
    # More samples give a tighter bound on average (weakly decreasing NLL).
    nll = {k: torch.stack([tiny.estimate_nll(x, k, chunk_size=64) for _ in range(4)]).mean(0) for k in (1, 8, 32)}
    # (in expectation per image; averaged over images to keep Monte Carlo noise small)
    assert float(nll[32].mean()) <= float(nll[8].mean()) <= float(nll[1].mean()), nll


def test_estimate_nll_chunking_does_not_change_the_result(tiny):
    tiny.eval()
    x = random_images(3, tiny.config)
    a = tiny.estimate_nll(x, 10, chunk_size=6, noise=Noise(generator=torch.Generator().manual_seed(2)))
    b = tiny.estimate_nll(x, 10, chunk_size=6, noise=Noise(generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(a, b)
    assert a.shape == (3,) and bool(torch.isfinite(a).all())


@pytest.mark.parametrize("preset", ["mnist", "omniglot", "cifar10"])
def test_sampling_shape_and_range(preset):
    torch.manual_seed(0)
    model = DVPVAE.from_preset(preset).eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = model.sample(2, temperature=0.8)
    assert x.shape == (2,) + model.config.image_shape
    assert bool(torch.isfinite(x).all()) and x.min() >= -1 and x.max() <= 1
    assert float(x.std()) > 0


def test_few_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = DVPVAE.from_preset("tiny")
    x = random_images(16, model.config, seed=7)
    dvpvae.set_dct_scale(model, x)
    opt = torch.optim.Adamax(model.parameters(), lr=3e-3)
    noise = Noise(generator=torch.Generator().manual_seed(0), record=True)
    model.train()
    first = model(x, noise)
    fixed = noise.recorded
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(x, Noise(fixed)).loss
        loss.backward()
        opt.step()
        model.constrain_()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * float(first.loss.detach()), losses


def test_active_units_counts_input_dependent_means(tiny):
    x = random_images(32, tiny.config)
    au = tiny.active_units(x)
    assert set(au) == {0.01, 0.001} and 0 < au[0.001] <= 1 and au[0.01] <= au[0.001]
    same = tiny.active_units(x[:1].repeat(32, 1, 1, 1))
    assert same[0.01] == 0.0 and same[0.001] == 0.0


@pytest.mark.parametrize("bad, message", [
    (lambda x: x[:, :0].repeat(1, 1, 1, 1), "channels"),
    (lambda x: torch.cat([x, x], 1), "channels"),
    (lambda x: x[..., :20, :20], "size"),
    (lambda x: x * 2, r"\[-1, 1\]"),
    (lambda x: x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True), float("nan")), "NaN"),
    (lambda x: ((x + 1) * 127.5).to(torch.uint8), "floating-point"),
    (lambda x: x[0], r"\(N, C, H, W\)"),
])
def test_bad_inputs_raise_clear_errors(tiny, bad, message):
    x = random_images(2, tiny.config)
    with pytest.raises(ValueError, match=message):
        tiny(bad(x))


def test_config_errors():
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("mnsit")
    with pytest.raises(KeyError, match="unknown config key"):
        get_config("mnist", num_chanels=3)
    with pytest.raises(ValueError, match="activation"):
        get_config("mnist", activation="tanh")
    cfg = get_config("cifar10", num_ch=64)
    assert cfg.num_ch == 64 and get_config("cifar10").num_ch == 128
    assert dvpvae.Config.from_dict(cfg.to_dict()) == cfg
