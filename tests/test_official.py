"""from_official reads both layouts of the research code's config: the composed hydra config a
run stores and the flattened layout of the parity fixtures (tests/golden)."""
import copy

import pytest
import torch
from golden_utils import load_golden

import dvpvae
from dvpvae.official import config_from_official


def _composed(flat: dict) -> dict:
    """The research code's composed run config for a fixture's flattened config: what hydra
    builds from configs/defaults.yaml + an experiment and the run stores resolved (encoder and
    decoder under model, the prior under the decoder, its UNet under ``model``), with the
    entries our translation ignores (``_target_``, interpolated copies, train / wandb)."""
    model = {k: v for k, v in flat["model"].items()}
    c, h, _ = flat["dataset"]["image_size"]
    shared = {k: model[k] for k in ("num_ch", "scale_ch_mult", "block_ch_mult", "latent_scales",
                                    "latent_width", "weight_norm", "batch_norm", "activation",
                                    "start_scale_at_x")}
    unet = dict(flat["unet"], _target_="utils.thirdparty.unet.UNetModel", image_size=model["ctx_size"],
                in_channels=c, out_channels=c)
    prior = dict(flat["z_L_prior"], _target_="model.ddgm.DiffusionPrior", model=unet,
                 noise_schedule=dict(flat["noise_schedule"], _target_="model.ddgm.LinearNoiseSchedule"))
    model.update(
        _target_="model.context_ladder_vae.CTX_LADDER_VAE",
        encoder=dict(flat["encoder"], _target_="model.encoder.SmallLadderEncoder", data_ch=c, data_dim=h,
                     dset=flat["dataset"]["name"], **shared),
        decoder=dict(flat["decoder"], _target_="model.context_decoder.ContextLadderDecoder", z_L_prior=prior,
                     ctx_size=model["ctx_size"], data_ch=c, data_dim=h, likelihood=model["likelihood"],
                     num_mix=model["num_mix"], padding_mode="zeros", **shared))
    return {"dataset": {"data_module": {"batch_size": 250, "test_batch_size": 500},
                        "image_size": [c, h, h], "n_classes": [10], "name": flat["dataset"]["name"]},
            "model": model, "train": {"seed": 123, "ema_rate": 0.999, "optimizer": {"lr": 0.01}},
            "wandb": {"setup": {"project": "dvp"}}}


@pytest.mark.parametrize("name", ["mnist", "cifar_small"])
def test_composed_config_gives_the_fixture_layouts_config(name):
    flat = load_golden(name)["config"]
    composed = _composed(flat)
    assert "encoder" not in flat["model"] and "z_L_prior" in composed["model"]["decoder"]
    cfg = config_from_official(composed)
    assert cfg == config_from_official(flat)
    assert cfg.num_ch == flat["model"]["num_ch"] and cfg.unet_channels == flat["unet"]["model_channels"]
    assert cfg.gamma_min == flat["noise_schedule"]["gamma_min"]


def test_from_official_accepts_the_composed_config():
    g = load_golden("mnist")
    a = dvpvae.from_official(g["state_dict"], g["config"])
    b = dvpvae.from_official(g["state_dict"], _composed(g["config"]))
    assert a.config == b.config
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_missing_entry_is_named():
    composed = _composed(load_golden("mnist")["config"])
    broken = copy.deepcopy(composed)
    del broken["model"]["decoder"]["z_L_prior"]["T"]
    with pytest.raises(ValueError, match=r"lacks model\.decoder\.z_L_prior\.T"):
        config_from_official(broken)
    broken = copy.deepcopy(composed)
    del broken["model"]["decoder"]["z_L_prior"]["model"]
    with pytest.raises(ValueError, match=r"lacks model\.decoder\.z_L_prior\.model$"):
        config_from_official(broken)
    flat = copy.deepcopy(load_golden("mnist")["config"])
    del flat["unet"]
    with pytest.raises(ValueError, match="lacks unet"):
        config_from_official(flat)
