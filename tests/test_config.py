"""Config: every field is used or rejected, one activation list, presets build."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import dvpvae
from dvpvae.config import ACTIVATIONS, PRESETS, Config, get_config
from dvpvae.kernels.conv1x1_act import ACTIVATIONS as KERNEL_ACTIVATIONS


@pytest.mark.parametrize("field, value", [("num_postprocess_blocks", 1), ("num_postprocess_blocks", 2),
                                          ("unet_heads", 2), ("unet_heads", 4)])
def test_unimplemented_fields_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be") as info:
        get_config("mnist", **{field: value})
    assert str(value) in str(info.value)
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        Config(**{field: value})
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        Config.from_dict({**Config().to_dict(), field: value})


def test_unimplemented_fields_accept_the_paper_value():
    cfg = get_config("mnist", num_postprocess_blocks=0, unet_heads=1)
    assert cfg == PRESETS["mnist"]


def test_activations_come_from_the_kernels():
    assert ACTIVATIONS == tuple(a for a in KERNEL_ACTIVATIONS if a != "none")
    assert set(ACTIVATIONS) == {"relu", "silu", "elu", "gelu"}
    for act in ACTIVATIONS:
        assert get_config("tiny", activation=act).activation == act
    for bad in ("none", "tanh", "SiLU"):
        with pytest.raises(ValueError, match="activation must be one of"):
            get_config("tiny", activation=bad)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build(preset):
    cfg = get_config(preset)
    assert Config.from_dict(cfg.to_dict()) == cfg
    model = dvpvae.DVPVAE(preset)
    assert model.config == cfg
    if preset == "tiny":
        out = model(torch.rand(2, *cfg.image_shape) * 2 - 1)
        assert out.kl.shape[0] == 2 and torch.isfinite(out.loss)


def test_every_field_has_a_default():
    # A field added without a default would break from_dict of older checkpoints.
    for f in dataclasses.fields(Config):
        assert f.default is not dataclasses.MISSING, f.name
