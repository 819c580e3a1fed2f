"""benchmarks/throughput.py's loader of the authors' code, against a generated miniature checkout.

CI has no checkout of AKuzina/dvp_vae, so ``tests/official_checkout.py`` writes one with the
same packages and module-level imports. Every third-party package it imports is hidden from
the import system here, as on a machine with torch and numpy only: a package the loader
does not stub fails these tests, whatever this environment has installed.
"""
from __future__ import annotations

import importlib.abc
import sys

import pytest
import torch

from official_checkout import third_party_imports, write_checkout
from test_benchmarks import TINY, _load_benchmark

HIDDEN = third_party_imports()


class _Hide(importlib.abc.MetaPathFinder):
    """Wraps one finder of sys.meta_path and finds nothing for the hidden packages."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(fullname, path, target)

    def invalidate_caches(self):
        getattr(self.inner, "invalidate_caches", lambda: None)()


@pytest.fixture
def bare_environment(monkeypatch):
    """The hidden packages unimportable for the test; sys.modules restored afterwards."""
    saved = {k: m for k, m in sys.modules.items() if k.split(".")[0] in HIDDEN}
    for k in saved:
        del sys.modules[k]
    monkeypatch.setattr(sys, "meta_path", [_Hide(f) if hasattr(f, "find_spec") else f for f in sys.meta_path])
    yield
    for k in [k for k in sys.modules if k.split(".")[0] in HIDDEN]:
        del sys.modules[k]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def throughput():
    return _load_benchmark("throughput")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    return write_checkout(tmp_path_factory.mktemp("dvp_vae"))


def _config():
    from dvpvae import get_config

    # tiny's latent_scales (2, 1) are unequal; the logistic mixture's sampler needs one_hot.
    return get_config("tiny", likelihood="logistic_mixture", num_mix=3)


def test_miniature_hides_what_a_user_may_lack():
    assert {"wandb", "hydra", "omegaconf", "torchvision", "six", "torchmetrics"} <= HIDDEN


def test_loader_builds_and_runs_the_miniature(throughput, checkout, bare_environment):
    cfg = _config()
    images = throughput.make_images(cfg, 8)
    with pytest.raises(ImportError):
        __import__("six")  # hidden for real
    model, notes = throughput.build_official(checkout, cfg, images, torch.device("cpu"))
    stubbed = next(n for n in notes if n.startswith("official: stubbed missing packages "))
    assert set(stubbed.rsplit(" ", 1)[1].split(",")) == HIDDEN
    assert "official: defined the missing utils.distribution.one_hot" in notes
    # The decoder reversed its own list, not the encoder's or the model's.
    assert model.encoder.latent_scales == [2, 1] and model.latent_scales == [2, 1]
    assert model.decoder.latent_scales == [1, 2]
    scale = model.decoder.decoder_blocks[0].dct_scale
    assert not torch.equal(scale, torch.ones_like(scale))  # set from the images
    prov = throughput.official_provider(model, cfg)
    x = images[:2]
    step = prov.make_train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step(x)
    step(x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # trains a copy
    prov.eval_fn(x)
    nll, _ = model.estimate_nll([x, torch.zeros(2, dtype=torch.long)], 3)
    assert nll.shape == (2,) and torch.isfinite(nll).all()
    assert model.generate_x(3).shape == (3,) + cfg.image_shape  # on the CPU, not 'cuda'


def test_a_missing_stub_fails(throughput, checkout, bare_environment, monkeypatch):
    monkeypatch.setattr(throughput, "_STUB_ROOTS", tuple(r for r in throughput._STUB_ROOTS if r != "six"))
    cfg = _config()
    with pytest.raises(ModuleNotFoundError, match="six"):
        throughput.build_official(checkout, cfg, throughput.make_images(cfg, 8), torch.device("cpu"))


def test_throughput_times_the_miniature(throughput, checkout, bare_environment):
    rep = throughput.run(throughput.parse_args(TINY + ["--providers", "official", "--official", checkout,
                                                       "--no-flops"]))
    rows = {(r["model"], r["task"]): r for r in rep["results"]}
    for task in ("train", "eval", "nll", "sample"):
        assert "error" not in rows[("official", task)], rows[("official", task)]
        assert rows[("official", task)]["images_per_s"] > 0
    assert not any(n.startswith("official skipped") for n in rep["notes"])
