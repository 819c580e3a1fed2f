"""Invariants of the reference model that can fail."""
import copy
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


def trajectory_log_ratio(prior, u, e):
    """log p(u, z_0..z_1) - log q(z_0..z_1 | u) written out from MODEL.md sections 5 and 7."""
    T = prior.T
    g = prior.gamma_min + (prior.gamma_max - prior.gamma_min) * torch.arange(T + 1, dtype=u.dtype) / T
    alpha, sigma = torch.sigmoid(-g).sqrt(), torch.sigmoid(g).sqrt()
    normal = torch.distributions.Normal

    def total(log_prob):
        return log_prob.flatten(1).sum(-1)

    z = [alpha[0] * u + sigma[0] * e[0]]
    log_q = total(normal(alpha[0] * u, sigma[0]).log_prob(z[0]))
    for i in range(1, T + 1):
        a_ts = alpha[i] / alpha[i - 1]
        s_ts = (sigma[i] ** 2 - a_ts ** 2 * sigma[i - 1] ** 2).sqrt()
        z.append(a_ts * z[-1] + s_ts * e[i])
        log_q = log_q + total(normal(a_ts * z[i - 1], s_ts).log_prob(z[i]))
    log_p = total(normal(0.0, 1.0).log_prob(z[T]))
    for i in range(T, 0, -1):
        a_ts = alpha[i] / alpha[i - 1]
        s2_ts = sigma[i] ** 2 - a_ts ** 2 * sigma[i - 1] ** 2
        eps_hat = prior.unet(z[i], torch.full((u.shape[0],), i / T, dtype=u.dtype))
        x_hat = ((z[i] - sigma[i] * eps_hat) / alpha[i]).clamp(-1, 1)
        mean = a_ts * sigma[i - 1] ** 2 / sigma[i] ** 2 * z[i] + alpha[i - 1] * s2_ts / sigma[i] ** 2 * x_hat
        log_p = log_p + total(normal(mean, (s2_ts * sigma[i - 1] ** 2 / sigma[i] ** 2).sqrt()).log_prob(z[i - 1]))
    log_p = log_p + total(normal(z[0] / alpha[0], math.exp(0.5 * prior.gamma_min)).log_prob(u))
    return log_p - log_q


@torch.no_grad()
def test_one_sample_importance_weight_is_the_elbo_written_out(tiny):
    """k = 1: -estimate_nll is log p(x, z, u, trajectory) - log q(z, u, trajectory | x) at
    the recorded draws, every density sampled (an analytic KL or a plug-in bound for log p(u)
    would change the number)."""
    model = copy.deepcopy(tiny).double()
    x = random_images(3, model.config).double()
    rec = Noise(generator=torch.Generator().manual_seed(7), record=True)
    log_w = -model.estimate_nll(x, 1, noise=rec)
    d = rec.recorded
    _, layers, _ = model.decoder(x, model.encoder(x, model.ops), Noise(d), None, model.ops)
    params = model.decoder.aggregate([lay.z for lay in layers[1:]], model.ops)
    probs = torch.sigmoid(params).clamp(1e-7, 1 - 1e-7)
    target = (d["binarize"] < (x + 1) / 2).double()
    want = torch.distributions.Bernoulli(probs=probs).log_prob(target).flatten(1).sum(-1)
    normal = torch.distributions.Normal
    for lay in layers[1:]:
        want = want + (normal(lay.p_mu, (0.5 * lay.p_logvar).exp()).log_prob(lay.z)
                       - normal(lay.q_mu, (0.5 * lay.q_logvar).exp()).log_prob(lay.z)).flatten(1).sum(-1)
    u = layers[0]
    want = want - normal(u.q_mu, (0.5 * u.q_logvar).exp()).log_prob(u.z).flatten(1).sum(-1)
    want = want + trajectory_log_ratio(model.prior, u.z, d["trajectory_eps"])
    # (the tabulated schedule coefficients are float32 values, hence rtol 1e-6)
    torch.testing.assert_close(log_w, want, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_estimate_nll_does_not_depend_on_chunk_size(tiny):
    x = random_images(3, tiny.config)
    results = []
    for chunk in (3, 6, 21):  # 1, 2 and all 7 samples of each image per pass
        noise = Noise(generator=torch.Generator().manual_seed(2))
        results.append(tiny.estimate_nll(x, 7, chunk_size=chunk, noise=noise, return_log_weights=True))
    for nll, log_w in results[1:]:
        torch.testing.assert_close(log_w, results[0][1], rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(nll, results[0][0], rtol=1e-6, atol=1e-4)
    assert results[0][0].shape == (3,) and bool(torch.isfinite(results[0][0]).all())


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
