"""Parity with fixtures recorded from the authors' research code (tests/golden/README.md)."""
import json
import os

import pytest
import torch

import dvpvae
from dvpvae import DVPVAE, Noise
from golden_utils import GOLDEN_DIR, forward_noise, golden_model, load_golden, sample_noise

NAMES = ["mnist", "cifar_small"]


def assert_rel(actual, expected, rtol, what):
    err = float((actual.detach() - expected).abs().max() / expected.abs().max().clamp(min=1e-12))
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"


@pytest.fixture(scope="module", params=NAMES)
def golden(request):
    g = load_golden(request.param)
    model = golden_model(g)
    return g, model


def test_trainable_parameter_counts_match_research_code():
    counts = json.load(open(os.path.join(GOLDEN_DIR, "param_counts.json")))
    for preset in ("mnist", "omniglot", "cifar10"):
        n = DVPVAE.from_preset(preset).num_parameters()
        print(f"{preset}: {n:,} trainable parameters")
        assert n == counts[preset]["trainable"]


def test_loaded_dct_scale_and_schedule(golden):
    g, model = golden
    torch.testing.assert_close(model.dct_scale, g["dct_scale"].reshape(model.dct_scale.shape))
    scale = dvpvae.dct.compute_dct_scale(torch.zeros(2, *model.config.image_shape) - 1, model.config.ctx_size)
    assert bool((scale >= 1).all()), "zero scale entries must be guarded"


@torch.no_grad()
def test_deterministic_intermediates(golden):
    g, model = golden
    model.eval()
    pi = model.decoder.pseudoinput
    x = g["x"]
    assert_rel(pi.mean(x, model.ops), g["u_mean"], 1e-5, "pseudoinput mean")
    assert_rel(pi.to_image(g["u_mean"], model.ops), g["ctx_image"], 1e-5, "pseudoinput image")
    for i, (ours, ref) in enumerate(zip(model.encoder(x, model.ops), g["s_enc"])):
        assert_rel(ours, ref, 1e-5, f"encoder feature {i}")
    assert_rel(pi.prior.unet(g["unet_in"], g["unet_t"]), g["unet_out"], 1e-5, "UNet output")
    u = g["u_mean"]
    terms = pi.prior.neg_log_prob(u, Noise({"diffusion_eps0": g["L0_eps"], "diffusion_t": g["Lt_t"].reshape(-1),
                                            "diffusion_eps": g["Lt_eps"]}), full=False)
    assert_rel(terms.L0, g["L0"], 1e-5, "L_0")
    assert_rel(terms.LT, g["LT"], 1e-5, "L_T")
    assert_rel(terms.Ldiff, g["Lt"], 1e-5, "L_diff at one t")


@pytest.mark.parametrize("mode", ["train", "test"])
def test_forward_given_recorded_draws(golden, mode):
    g, model = golden
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        out = model(g["x"], forward_noise(g, mode, model))
    assert_rel(out.loss, g[f"{mode}_loss_bpd"], 1e-5, "loss (bits/dim)")
    assert_rel(out.rec, g[f"{mode}_rec"], 1e-5, "reconstruction")
    for col in range(out.kl.shape[1]):
        assert_rel(out.kl[:, col], g[f"{mode}_kl"][:, col], 1e-5, f"KL column {col}")
    assert_rel(out.prior_terms.neg_log_p, g[f"{mode}_ctx_neg_log_p"], 1e-5, "-log p(u)")
    assert_rel(out.prior_terms.L0, g[f"{mode}_ctx_L0"], 1e-5, "L_0")
    assert_rel(out.prior_terms.Ldiff, g[f"{mode}_ctx_Lt"], 1e-5, "L_diff")
    for l, layer in enumerate(out.layers):
        assert_rel(layer.z, g[f"{mode}_z"][l], 1e-5, f"z[{l}]")
        assert_rel(layer.q_mu, g[f"{mode}_q_mu"][l], 1e-5, f"q_mu[{l}]")
        assert_rel(layer.q_logvar, g[f"{mode}_q_logvar"][l], 1e-5, f"q_logvar[{l}]")
        if l > 0:
            assert_rel(layer.p_mu, g[f"{mode}_p_mu"][l - 1], 1e-5, f"p_mu[{l}]")
            assert_rel(layer.p_logvar, g[f"{mode}_p_logvar"][l - 1], 1e-5, f"p_logvar[{l}]")
    torch.testing.assert_close(out.elbo, -(out.rec + out.kl.sum(-1)))
    if mode == "train":
        model.zero_grad()
        out.loss.backward()
        groups = {"total": lambda k: True, "encoder": lambda k: k.startswith("encoder"),
                  "decoder_ex_prior": lambda k: k.startswith("decoder") and ".prior." not in k,
                  "prior": lambda k: ".prior." in k}
        for group, keep in groups.items():
            norm = sum(float(p.grad.double().pow(2).sum()) for k, p in model.named_parameters()
                       if p.grad is not None and keep(k)) ** 0.5
            assert abs(norm - g["train_grad_norm"][group]) <= 1e-5 * g["train_grad_norm"][group], group


@torch.no_grad()
def test_generation_given_recorded_draws(golden):
    g, model = golden
    model.eval()
    assert_rel(model.sample(4, noise=sample_noise(g, model)), g["samples"], 1e-5, "samples")
    draws = [d["tensor"] for d in g["prior_sample_draws"]]
    u = model.prior.sample(4, noise=Noise({"prior_zT": draws[0], "prior_eps": torch.stack(draws[1:])}))
    assert_rel(u, g["prior_samples"], 1e-5, "prior samples")
    assert_rel(model.decoder.pseudoinput.to_image(u, model.ops), g["prior_samples_image"], 1e-5, "prior sample images")


@torch.no_grad()
def test_monte_carlo_elbo_within_standard_errors(golden):
    g, model = golden
    model.eval()
    M = g["mc_M"]
    torch.manual_seed(300)
    out = model(g["x"].repeat(M, 1, 1, 1))
    B = g["x"].shape[0]
    for ours, key in [(out.elbo.reshape(M, B), "mc_elbo"), (-out.rec.reshape(M, B), "mc_log_px"),
                      (out.kl.sum(-1).reshape(M, B), "mc_kl")]:
        se = ((ours.std(0) ** 2 + g[f"{key}_std"] ** 2) / M).sqrt()
        z = (ours.mean(0) - g[f"{key}_mean"]).abs() / se
        assert bool((z < 4.5).all()), f"{key}: |difference| / standard error = {z.tolist()}"
