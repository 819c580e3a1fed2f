"""Load weights saved by the authors' research code (AKuzina/dvp_vae) into ``DVPVAE``.

The research code names parameters after its module nesting (``decoder.decoder_blocks.3
.s_to_p.net.1.net.0.weight``); the rules below translate each name to ours. Buffers the
research code stores as parameters (DCT bases, the fixed residual gates, the noise
schedule) are checked or dropped, never silently mismatched.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from dvpvae.config import Config, get_config

_RES_ENC = {"0": "conv_in", "1": "conv_mid1", "2": "conv_mid2", "3": "conv_out"}
_UNET_RES = {"in_layers.0": "norm_in", "in_layers.2": "conv_in", "emb_layers.1": "film",
             "out_layers.0": "norm_out", "out_layers.3": "conv_out", "skip_connection": "skip"}


def _unet_block(m: re.Match) -> str:
    group, idx, layer, kind = m[1], int(m[2]), m[3], m[4]
    if group == "input_blocks":
        head = f"down.{idx - 1}"
    elif group == "middle_block":
        head = {0: "mid1", 2: "mid2"}[idx]
    else:
        head = f"up.{idx}"
    return f"{head}.{_UNET_RES[layer]}.{kind}"


# (pattern, our name) rules tried in order on the part of a name inside a research-code
# ResBlock / UNet; the first full match wins.
_RESBLOCK_RULES = (
    (r"beta.*", lambda m: "gate"),
    (r"net\.(\d)\.net\.[01]\.(weight|bias)", lambda m: f"{_RES_ENC[m[1]]}.{m[2]}"),
    (r"net\.3\.(weight|bias)", lambda m: f"conv_out.{m[1]}"),
    (r"skip\.(weight|bias)", lambda m: m[0]),
)
_UNET_RULES = (
    (r"input_blocks\.0\.0\.(weight|bias)", lambda m: f"input_conv.{m[1]}"),
    (r"time_embed\.(\d)\.(weight|bias)", lambda m: m[0]),
    (r"out\.0\.(weight|bias)", lambda m: f"out_norm.{m[1]}"),
    (r"out\.2\.(weight|bias)", lambda m: f"out_conv.{m[1]}"),
    (r"middle_block\.1\.(norm|qkv|proj_out)\.(weight|bias)",
     lambda m: f"mid_attn.{'proj' if m[1] == 'proj_out' else m[1]}.{m[2]}"),
    (r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:0\.)?(\w+\.\d|skip_connection)\.(weight|bias)",
     _unet_block),
)


def _translate(tail: str, rules) -> str:
    for pattern, rename in rules:
        m = re.fullmatch(pattern, tail)
        if m:
            return rename(m)
    raise KeyError(tail)


def official_key(name: str) -> str | None:
    """Our parameter name for a research-code name; None for entries we do not keep."""
    if name.startswith("decoder.decoder_blocks.0.ctx_prior.") or ".dct." in name \
            or ".noise_schedule." in name:
        return None  # alias of decoder.z_L_prior / fixed DCT basis / fixed schedule
    try:
        if name.startswith("encoder.pre_process.0."):
            return "encoder.input_conv." + name.rsplit(".", 1)[1]
        m = re.fullmatch(r"encoder\.encoder_blocks\.(\d+)\.(\d+)\.(.+)", name)
        if m:
            return f"encoder.scales.{m.group(1)}.{m.group(2)}.{_translate(m.group(3), _RESBLOCK_RULES)}"
        if name == "decoder.decoder_blocks.0.q_logvar":
            return "decoder.pseudoinput.q_logvar"
        if name == "decoder.decoder_blocks.0.dct_scale":
            return "decoder.pseudoinput.dct_scale"
        if name.startswith("decoder.z_L_prior.model."):
            return "decoder.pseudoinput.prior.unet." + _translate(name[len("decoder.z_L_prior.model."):], _UNET_RULES)
        m = re.fullmatch(r"decoder\.decoder_blocks\.(\d+)\.(z_up|resnet\.\d+|s_to_p|s_to_q)\.?(.*)", name)
        if m:
            block, part, tail = int(m.group(1)) - 1, m.group(2), m.group(3)
            if part == "z_up":
                return f"decoder.blocks.{block}.z_proj.{tail}"
            ours = {"s_to_p": "prior_net", "s_to_q": "posterior_net"}.get(part, part)
            return f"decoder.blocks.{block}.{ours}.{_translate(tail, _RESBLOCK_RULES)}"
        if name.startswith("decoder.post_process.0."):
            return "decoder.out_conv." + name.rsplit(".", 1)[1]
        if name.startswith("decoder.z_to_features."):
            return name
    except KeyError:
        pass
    raise KeyError(f"unrecognised research-code parameter name {name!r}")


# Where each section sits: in the composed hydra config a run stores (wandb run config,
# ``OmegaConf.to_container(resolve=True)``) and in the flattened layout of the parity
# fixtures (tests/golden: ``model`` holds only the model's own kwargs).
_COMPOSED = {"dataset": "dataset", "model": "model", "encoder": "model.encoder", "decoder": "model.decoder",
             "z_L_prior": "model.decoder.z_L_prior", "unet": "model.decoder.z_L_prior.model",
             "noise_schedule": "model.decoder.z_L_prior.noise_schedule"}
_FLATTENED = {name: name for name in _COMPOSED}


def _sections(cfg: Mapping[str, Any]) -> dict[str, tuple[Mapping[str, Any], str]]:
    """section name -> (its mapping, its dotted path) for either config layout."""
    model = cfg.get("model")
    layout = _COMPOSED if isinstance(model, Mapping) and "encoder" in model else _FLATTENED
    out = {}
    for name, path in layout.items():
        d = cfg
        for i, key in enumerate(path.split(".")):
            if not isinstance(d, Mapping) or key not in d:
                raise ValueError(f"research-code config lacks {'.'.join(path.split('.')[:i + 1])}")
            d = d[key]
        out[name] = (d, path)
    return out


def config_from_official(cfg: Mapping[str, Any], base: str = "mnist") -> Config:
    """Our Config from a research-code config: the composed hydra config a run stores
    (``model.encoder``, ``model.decoder.z_L_prior.model``, ...) or the flattened layout of
    the parity fixtures. A missing entry raises ValueError naming it."""
    sections = _sections(cfg)

    def get(section: str, key: str, default: Any = ...) -> Any:
        d, path = sections[section]
        if key not in d:
            if default is ...:
                raise ValueError(f"research-code config lacks {path}.{key}")
            return default
        return d[key]

    if get("model", "ctx_type", "dct") != "dct" or get("decoder", "decoder_res_mode", "2x3") != "2x3":
        raise ValueError("only the DCT context and the '2x3' decoder blocks are supported")
    if get("model", "batch_norm", False) or get("model", "weight_norm", False):
        raise ValueError("batch_norm / weight_norm variants are not part of the paper's configs")
    if get("encoder", "num_init_blocks", 0) != 0:
        raise ValueError("num_init_blocks > 0 is not supported")
    c, h, _ = get("dataset", "image_size")
    name = get("dataset", "name")
    return get_config(
        base, dataset=name, image_channels=c, image_size=h,
        likelihood=get("model", "likelihood"), num_mix=get("model", "num_mix"), ctx_size=get("model", "ctx_size"),
        latent_scales=tuple(get("model", "latent_scales")), latent_width=tuple(get("model", "latent_width")),
        activation=get("model", "activation"), num_ch=get("model", "num_ch"),
        scale_ch_mult=get("model", "scale_ch_mult"), block_ch_mult=get("model", "block_ch_mult"),
        start_scale_at_x=get("model", "start_scale_at_x"), standardize_input=name == "cifar10",
        enc_blocks_per_scale=get("encoder", "num_blocks_per_scale"),
        dec_blocks_per_scale=get("decoder", "num_blocks_per_scale"),
        num_postprocess_blocks=get("decoder", "num_postprocess_blocks"),
        min_logvar=float(get("decoder", "min_logvar")),
        unet_channels=get("unet", "model_channels"), unet_res_blocks=get("unet", "num_res_blocks"),
        unet_dropout=float(get("unet", "dropout")), unet_heads=get("unet", "num_heads"),
        diffusion_steps=get("z_L_prior", "T"), gamma_min=float(get("noise_schedule", "gamma_min")),
        gamma_max=float(get("noise_schedule", "gamma_max")))


def from_official(state_dict: Mapping[str, torch.Tensor], preset_or_config: str | Config | Mapping):
    """Build a ``DVPVAE`` holding the weights of a research-code ``state_dict``.

    ``preset_or_config``: a preset name, a ``Config``, or the research code's config dict.
    """
    from dvpvae.model import DVPVAE

    if isinstance(preset_or_config, Mapping):
        cfg = config_from_official(preset_or_config)
    else:
        cfg = get_config(preset_or_config)
    model = DVPVAE(cfg)
    ours = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for name, value in state_dict.items():
        key = official_key(name)
        if key is None:
            if name.endswith("noise_schedule.gamma_min") or name.endswith("noise_schedule.gamma_max"):
                expect = cfg.gamma_min if name.endswith("gamma_min") else cfg.gamma_max
                if abs(float(value.reshape(-1)[0]) - expect) > 1e-6:
                    raise ValueError(f"{name} = {float(value.reshape(-1)[0])} does not match the config ({expect})")
            continue
        if key not in ours:
            raise KeyError(f"research-code parameter {name!r} maps to {key!r}, which this config lacks")
        mapped[key] = value.reshape(ours[key].shape) if value.numel() == ours[key].numel() else value
        if mapped[key].shape != ours[key].shape:
            raise ValueError(f"shape mismatch for {name!r}: {tuple(value.shape)} vs ours {tuple(ours[key].shape)}")
    missing = sorted(set(ours) - set(mapped))
    if missing:
        raise KeyError(f"research-code state_dict lacks entries for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    model.load_state_dict(mapped)
    return model
