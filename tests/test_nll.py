"""The importance-sampled NLL (MODEL.md section 7): the trajectory weight is valid, the
plug-in estimate is the old one under its own name."""
import copy
import math

import pytest
import torch

import dvpvae
from dvpvae import DVPVAE, Noise
from dvpvae.decoder import gaussian_log_density
from dvpvae.diffusion import DiffusionPrior


pytestmark = pytest.mark.usefixtures("one_thread")


def log_mean_exp(a, dim=0):
    return torch.logsumexp(a, dim) - math.log(a.shape[dim])


@torch.no_grad()
def integrated_log_prior(prior, u, h=0.02, half_width=6.0):
    """log p(u) of the T-step model of a one-dimensional prior by quadrature: the density of
    z_1 ~ N(0, 1) pushed through the sampler's T steps (``prior.step``, whose draw is
    mean + c * eps) on a grid, then u | z_0 ~ N(z_0 / alpha_0, exp(gamma_min))."""
    z = torch.arange(-half_width, half_width + h / 2, h, dtype=torch.float64)
    zz = z.view(-1, 1, 1, 1)
    dens = torch.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    for i in range(prior.T - 1, -1, -1):
        mean = prior.step(zz, i, torch.zeros_like(zz), 1.0).flatten()
        c = prior.step(zz, i, torch.ones_like(zz), 1.0).flatten() - mean
        kernel = torch.exp(-0.5 * ((z[:, None] - mean) / c) ** 2) / (c * math.sqrt(2 * math.pi))
        dens = kernel @ dens * h
    assert abs(float(dens.sum() * h) - 1) < 1e-6, "the grid must hold the whole density"
    var = math.exp(prior.gamma_min)
    alpha0 = math.sqrt(1 / (1 + var))
    lik = torch.exp(-0.5 * (u[:, None] - z / alpha0) ** 2 / var) / math.sqrt(2 * math.pi * var)
    return ((lik * dens).sum(1) * h).log()


@torch.no_grad()
def test_trajectory_weight_converges_to_the_integrated_prior():
    # One pseudoinput element: p(u) of the T-step model is a 1-D integral. 32 UNet channels
    # (2 per GroupNorm group) so that eps_hat depends on z_t and t; moderate gammas so that
    # a 0.02 grid resolves the narrowest step (c_noise ~ 0.12).
    prior = DiffusionPrior(1, 1, 5, -4.0, 4.0, channels=32, num_res_blocks=1, dropout=0.0).double().eval()
    for p in prior.parameters():
        p.add_(0.1 * torch.randn_like(p))
    us = torch.tensor([-0.7, 0.1, 0.9], dtype=torch.float64)
    exact = integrated_log_prior(prior, us)
    k = 4000
    eps = torch.randn(prior.T + 1, k * 3, 1, 1, 1, dtype=torch.float64)
    log_w, _ = prior.trajectory_terms(us.repeat(k).view(-1, 1, 1, 1), eps)
    log_w = log_w.view(k, 3)
    # the estimate converges: with k samples it is within a few standard errors of log p(u)
    # (delta method; heavy-tailed weights make the log estimate fall short more often)
    w = torch.exp(log_w - log_w.max(0).values)
    se = w.std(0) / math.sqrt(k) / w.mean(0)
    assert bool((se < 0.05).all()), se
    err = log_mean_exp(log_w) - exact
    assert bool((err.abs() < 4 * se + 0.01).all()), (err, se)
    # k = 1 is an ELBO, and the expected gap shrinks with k (averaged over blocks of k samples
    # and over the three u)
    gaps = [float((exact - log_mean_exp(log_w.view(k // kk, kk, 3), 1).mean(0)).mean()) for kk in (1, 10, 100)]
    assert gaps[0] > 0.5 and gaps[0] > 5 * gaps[1] and gaps[1] > abs(gaps[2]), gaps


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = DVPVAE.from_preset("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(3)
    dvpvae.set_dct_scale(model, torch.randint(0, 256, (64, 1, 28, 28), generator=g).float() / 127.5 - 1)
    return model.eval()


def images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g).float() / 127.5 - 1


@torch.no_grad()
def test_bound_plugin_is_the_eval_elbo_at_the_same_draws(tiny):
    """estimator="bound_plugin" with k = 1 is the old weight: the eval-mode forward's
    log p(x|z) and u column (one draw of the T-point bound) at the draws read off the
    trajectory, with the ladder latents' sampled densities; it differs from the valid weight."""
    model = copy.deepcopy(tiny).double()
    x = images(3).double()
    rec = Noise(generator=torch.Generator().manual_seed(4), record=True)
    plugin, log_w = model.estimate_nll(x, 1, noise=rec, estimator="bound_plugin", return_log_weights=True)
    d = rec.recorded
    assert set(d) == {"binarize", "u", "trajectory_eps", *(f"z{i}" for i in range(model.config.num_ladder_latents))}
    valid = model.estimate_nll(x, 1, noise=Noise(d))
    # u and the trajectory, as the forward pass draws them
    pi = model.decoder.pseudoinput
    u = pi.mean(x, model.ops) + torch.exp(0.5 * pi.posterior_logvar()) * d["u"]
    z, _ = model.prior.forward_chain(u, d["trajectory_eps"])
    T = model.config.diffusion_steps
    g = model.prior.gamma(torch.arange(1, T + 1, dtype=torch.float64) / T).view(-1, 1, 1, 1, 1)
    g0 = torch.tensor(model.config.gamma_min, dtype=torch.float64)
    draws = {**d, "diffusion_eps0": (z[0] - torch.sigmoid(-g0).sqrt() * u) / torch.sigmoid(g0).sqrt(),
             "diffusion_eps": (z[1:] - torch.sigmoid(-g).sqrt() * u) / torch.sigmoid(g).sqrt()}
    del draws["trajectory_eps"]
    torch.testing.assert_close(-log_w[0], plugin)
    out = model(x, draws)
    ladder = sum(gaussian_log_density(lay.z, lay.p_mu, lay.p_logvar)
                 - gaussian_log_density(lay.z, lay.q_mu, lay.q_logvar) for lay in out.layers[1:])
    torch.testing.assert_close(-plugin, -out.rec - out.kl[:, 0] + ladder, rtol=1e-10, atol=1e-9)
    assert bool(((valid - plugin).abs() > 1.0).all()), (valid, plugin)


@torch.no_grad()
def test_return_log_weights_and_bad_arguments(tiny):
    x = images(2)
    nll, log_w = tiny.estimate_nll(x, 5, return_log_weights=True)
    assert log_w.shape == (5, 2)
    torch.testing.assert_close(nll, -(torch.logsumexp(log_w, 0) - math.log(5)))
    with pytest.raises(ValueError, match="unknown estimator 'analytic'"):
        tiny.estimate_nll(x, 2, estimator="analytic")
    for k in (0, 2.5):
        with pytest.raises(ValueError, match="importance samples k"):
            tiny.estimate_nll(x, k)
    with pytest.raises(ValueError, match="chunk_size"):
        tiny.estimate_nll(x, 2, chunk_size=0)
