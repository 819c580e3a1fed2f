"""The latent API: encode / decode / reconstruct / interpolate and per-layer temperatures,
checked against forward and sample with the same noise, for DVPVAE and FastDVPVAE."""
import json
import os

import numpy as np
import pytest
import torch

import datafiles
from dvpvae import DVPVAE, FastDVPVAE, Noise
from dvpvae import evaluate as E
from dvpvae import train as TR
from dvpvae.gpucheck import perturbed_model
from dvpvae.model import Decoded, Latents


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model, x = perturbed_model("tiny", seed=2)
    return model.eval(), x[:4]


def L(model):
    return model.config.num_ladder_latents


def seeded(seed, record=False):
    return Noise(generator=torch.Generator().manual_seed(seed), record=record)


def forward_draws(model, x, seed):
    """Forward pass with recorded draws: (output, draws)."""
    noise = seeded(seed, record=True)
    with torch.no_grad():
        out = model(x, noise)
    return out, noise.recorded


def gaussian_kl(q_mu, q_lv, p_mu, p_lv):
    return (0.5 * (p_lv - q_lv + (torch.exp(q_lv) + (q_mu - p_mu) ** 2) * torch.exp(-p_lv) - 1)).flatten(1).sum(-1)


@pytest.mark.parametrize("training", [False, True])
def test_encode_decode_round_trip_is_forward(tiny, training):
    model, x = tiny
    model.train(training)
    try:
        out, draws = forward_draws(model, x, 1)
        with torch.no_grad():
            lat = model.encode(x, draws)
            dec = model.decode(lat)
    finally:
        model.eval()
    assert isinstance(lat, Latents) and isinstance(dec, Decoded)
    # the order of DVPVAEOutput.kl: u, then the ladder top (coarsest) -> bottom
    assert len(lat.layers) == L(model) + 1
    assert [tuple(lay.z.shape[1:]) for lay in lat.ladder] == model.decoder.latent_shapes
    assert lat.ladder[0].z.shape[-1] < lat.ladder[-1].z.shape[-1]
    assert torch.equal(torch.stack([lay.kl for lay in lat.layers], 1), out.kl)
    for mine, fwd in zip(lat.layers, out.layers):
        for name in ("z", "q_mu", "q_logvar", "p_mu", "p_logvar"):
            a, b = getattr(mine, name), getattr(fwd, name)
            assert (a is None and b is None) or torch.equal(a, b), name
    # decode: the forward's likelihood parameters, hence its reconstruction term
    assert torch.equal(dec.params, out.likelihood_params)
    target = model.likelihood.target(x, Noise(draws))
    assert torch.equal(-model.likelihood.log_prob(dec.params, target), out.rec)
    assert all(torch.equal(a, b) for a, b in zip(dec.latents, lat.samples()))
    # the fields mean what they say: the ladder KL from q and p, u from its DCT context
    for lay in lat.ladder:
        torch.testing.assert_close(lay.kl, gaussian_kl(lay.q_mu, lay.q_logvar, lay.p_mu, lay.p_logvar))
    u = lat.u
    assert u.p_mu is None and u.p_logvar is None
    torch.testing.assert_close(u.z, u.q_mu + torch.exp(0.5 * u.q_logvar) * draws["u"])
    torch.testing.assert_close(u.q_mu, model.decoder.pseudoinput.mean(x, model.ops))
    torch.testing.assert_close(lat.context, model.decoder.pseudoinput.to_image(u.q_mu, model.ops))
    assert lat.context.shape == x.shape and float(lat.context.abs().max()) <= 1


def test_reconstruct_keeping_every_layer_is_the_posterior_path(tiny):
    model, x = tiny
    out, draws = forward_draws(model, x, 2)
    got = model.reconstruct(x, keep=L(model), noise=draws)
    assert torch.equal(got, model.likelihood.sample(out.likelihood_params, Noise(draws)))


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_reconstruct_keeps_the_top_layers_and_draws_the_rest(tiny, keep):
    model, x = tiny
    _, draws = forward_draws(model, x, 3)
    with torch.no_grad():
        lat = model.encode(x, draws)
        dec = model.decode(lat.samples(keep), noise=draws)
    for l in range(keep):
        assert torch.equal(dec.latents[1 + l], lat.ladder[l].z)
    # the first drawn layer has the posterior path's prior (same u and z above) and draw z{keep}
    first = lat.ladder[keep]
    torch.testing.assert_close(dec.latents[1 + keep], first.p_mu + torch.exp(0.5 * first.p_logvar) * draws[f"z{keep}"])
    assert not torch.equal(dec.latents[1 + keep], first.z)
    assert torch.equal(model.reconstruct(x, keep, noise=draws), dec.images)


def test_decode_u_alone_is_the_sampler_from_that_u(tiny):
    model, _ = tiny
    noise = seeded(4, record=True)
    images = model.sample(3, 0.7, noise=noise)
    u = model.sample_pseudoinputs(3, 1.0, Noise(noise.recorded))  # the same prior draws: the same u
    dec = model.decode(u, 0.7, noise=noise.recorded)
    assert torch.equal(dec.images, images)
    assert len(dec.latents) == L(model) + 1


def test_per_layer_temperature(tiny):
    model, _ = tiny
    n = L(model)
    a = model.sample(3, 0.6, noise=seeded(5))
    assert torch.equal(model.sample(3, [0.6] * n, noise=seeded(5)), a)
    assert torch.equal(model.sample(3, (0.6,) * n, noise=seeded(5)), a)
    # a per-layer value acts on its layer: temperature 0 at the bottom fixes that latent
    u = model.sample_pseudoinputs(2, 1.0, seeded(6))
    rec = seeded(7, record=True)
    ones = model.decode(u, 1.0, noise=rec)
    cold = model.decode(u, [1.0] * (n - 1) + [0.0], noise=rec.recorded)
    for l in range(n):
        assert torch.equal(cold.latents[1 + l], ones.latents[1 + l]) == (l < n - 1)
    other = dict(rec.recorded, **{f"z{n - 1}": torch.randn_like(rec.recorded[f"z{n - 1}"])})
    assert torch.equal(model.decode(u, [1.0] * (n - 1) + [0.0], noise=other).latents[-1], cold.latents[-1])


def test_interpolate_runs_between_the_posterior_means(tiny):
    model, x = tiny
    x1, x2 = x[:2], x[2:4]
    steps = 5
    got = model.interpolate(x1, x2, steps)
    assert got.shape == (2, steps) + x1.shape[1:]
    zeros = {"u": torch.zeros(2, *model.latent_shapes[0])}
    zeros.update({f"z{l}": torch.zeros(2, *s) for l, s in enumerate(model.decoder.latent_shapes)})
    torch.testing.assert_close(got[:, 0], model.reconstruct(x1, L(model), noise=zeros), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, -1], model.reconstruct(x2, L(model), noise=zeros), rtol=0, atol=1e-6)
    with torch.no_grad():
        a, b = (model.encode(xi, zeros).samples() for xi in (x1, x2))
        mid = model.decode([(za + zb) / 2 for za, zb in zip(a, b)]).images
    torch.testing.assert_close(got[:, steps // 2], mid, rtol=0, atol=1e-6)
    same = model.interpolate(x1, x1, 3)
    torch.testing.assert_close(same, same[:, :1].expand_as(same), rtol=0, atol=1e-6)


def test_fast_model_gives_the_same_latents_and_images(tiny):
    model, x = tiny
    fast = FastDVPVAE.from_reference(model, compile=False)
    assert fast.ops_for(x.device).name == "cpu"
    _, draws = forward_draws(model, x, 9)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        for a, b in zip(model.encode(x, draws).layers, fast.encode(x, draws).layers):
            close(a.z, b.z)
            close(a.kl, b.kl)
    for keep in (0, L(model)):
        close(fast.reconstruct(x, keep, noise=draws), model.reconstruct(x, keep, noise=draws))
    close(fast.interpolate(x[:2], x[2:], 3), model.interpolate(x[:2], x[2:], 3))
    temps = [0.5, 0.9, 0.0]
    close(fast.sample(2, temps, noise=seeded(10), prior_steps=2), model.sample(2, temps, noise=seeded(10), prior_steps=2))


def test_decode_draws_the_logistic_mixture_by_name():
    model = DVPVAE("tiny", likelihood="logistic_mixture", image_channels=3).eval()
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    _, draws = forward_draws(model, x, 11)
    draws["mix_component"] = torch.rand(2, model.config.num_mix, 28, 28) * 0.98 + 0.01
    draws["mix_logistic"] = torch.rand(2, 3, 28, 28) * 0.98 + 0.01
    with torch.no_grad():
        params = model(x, draws).likelihood_params
    want = model.likelihood.sample(params, Noise(draws))
    assert torch.equal(model.reconstruct(x, L(model), noise=draws), want)


@pytest.mark.parametrize("call,message", [
    (lambda m, x: m.sample(2, [1.0, 1.0]), "temperature has 2 values; the model has 3 ladder layers"),
    (lambda m, x: m.sample(2, [1.0, -1.0, 1.0]), "finite non-negative"),
    (lambda m, x: m.sample(2, float("nan")), "finite non-negative"),
    (lambda m, x: m.reconstruct(x, 4), r"keep must be an integer in 0 \.\.\. 3"),
    (lambda m, x: m.reconstruct(x, -1), "keep must be an integer"),
    (lambda m, x: m.reconstruct(x, 1.0), "keep must be an integer"),
    (lambda m, x: m.reconstruct(x * 2, 1), r"images must lie in \[-1, 1\]"),
    (lambda m, x: m.decode(torch.zeros(2, 1, 4, 4)), r"latent u has shape \(2, 1, 4, 4\), expected \(2, 1, 5, 5\)"),
    (lambda m, x: m.decode([torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 14, 14)]), "latent z0 has shape"),
    (lambda m, x: m.decode([torch.zeros(2, 1, 5, 5)] * 5), "at most 3 ladder latents, got 5"),
    (lambda m, x: m.decode([]), "at most 3 ladder latents, got 0"),
    (lambda m, x: m.decode([torch.zeros(2, 1, 5, 5), "z"]), "latent z0 must be a floating-point tensor"),
    (lambda m, x: m.decode(torch.zeros(2, 1, 5, 5), [1.0]), "temperature has 1 values"),
    (lambda m, x: m.interpolate(x[:2], x[2:], 1), "steps must be an integer >= 2"),
    (lambda m, x: m.interpolate(x[:2], x[1:], 3), "x1 and x2 must have the same shape"),
])
def test_bad_inputs_raise(tiny, call, message):
    model, x = tiny
    with pytest.raises(ValueError, match=message):
        call(model, x)


def test_evaluate_writes_the_layer_grid(tmp_path):
    x = ((datafiles.images(40, seed=3) > 160) * 255).astype(np.uint8)[:, 0]
    np.savez(tmp_path / "d.npz", x=x[:32], x_test=x[32:])
    TR.main(["--preset", "tiny", "--data", "npz", "--data-root", str(tmp_path / "d.npz"), "--out",
             str(tmp_path / "run"), "--max-steps", "1", "--eval-every", "1", "--threads", "1", "--num-samples", "4"])
    js = tmp_path / "res.json"
    assert E.main([str(tmp_path / "run"), "--k", "2", "--max-images", "5", "--num-samples", "4", "--layer-grid",
                   "--prior-steps", "2", "--out-dir", str(tmp_path / "png"), "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["prior_steps"] == 2
    assert res["layer_grid"] == str(tmp_path / "png" / "layer_grid.png")
    assert os.path.getsize(res["layer_grid"]) > 0
    with pytest.raises(SystemExit):
        E.main([str(tmp_path / "run"), "--prior-steps", "0"])
