"""Configuration dataclass and the named presets of the paper (MODEL.md section 8).

One flat dataclass holds the model, diffusion-prior and training hyperparameters, so
that a single object drives the model constructor, the CLI flags and the checkpoint
JSON. Unknown keys and unknown preset names raise instead of being ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dvpvae.kernels.conv1x1_act import ACTIVATIONS as _KERNEL_ACTIVATIONS

# The kernels' list is the one home of the activation names; "none" is not a model choice.
ACTIVATIONS = tuple(a for a in _KERNEL_ACTIVATIONS if a != "none")
LIKELIHOODS = ("bernoulli", "logistic_mixture")


# Compute precisions of FastDVPVAE (the reference model computes in float32 only).
PRECISIONS = ("float32", "bf16")

@dataclass
class Config:
    """All hyperparameters of a DVP-VAE run. Field names drive the CLI overrides."""

    # data
    dataset: str = "mnist"
    image_channels: int = 1
    image_size: int = 28
    # model
    likelihood: str = "bernoulli"
    num_mix: int = 1
    ctx_size: int = 7
    latent_scales: tuple[int, ...] = (4, 4)  # fine -> coarse
    latent_width: tuple[int, ...] = (1, 1)  # fine -> coarse
    activation: str = "silu"
    num_ch: int = 32
    scale_ch_mult: float = 1.0
    block_ch_mult: float = 1.0
    start_scale_at_x: bool = False
    standardize_input: bool = False  # encoder sees (pixel - 120.63838) / 64.16736 (CIFAR10)
    enc_blocks_per_scale: int = 3
    dec_blocks_per_scale: int = 1
    num_postprocess_blocks: int = 0  # only 0: the decoder has no post-processing blocks
    min_logvar: float = -10.0
    beta: float = 1.0
    # diffusion prior over the pseudoinputs
    unet_channels: int = 16
    unet_res_blocks: int = 2
    unet_dropout: float = 0.0
    unet_heads: int = 1  # only 1: the UNet's self-attention is single-head
    diffusion_steps: int = 25
    gamma_min: float = -6.0
    gamma_max: float = 7.0
    # training recipe
    batch_size: int = 250
    test_batch_size: int = 500
    lr: float = 1e-2
    weight_decay: float = 1e-6
    adam_eps: float = 1e-8
    epochs: int = 300
    warmup_epochs: int = 2
    eta_min: float = 1e-5
    grad_clip: float = 5.0
    grad_skip_thr: float = 0.0  # 0 disables skipping large-gradient updates
    grad_skip_factor: float = 0.0  # > 1: skip norms above this multiple of their running mean (0: off)
    max_consecutive_skips: int = 100  # stop the run after this many skipped steps in a row (0: never)
    ema_rate: float = 0.999
    ema_warmup: bool = True  # rate min(ema_rate, (1 + step) / (10 + step)); false: the paper's plain EMA
    val_size: int = 5000
    is_k: int = 1000
    seed: int = 123
    dct_scale_images: int = 50000

    def __post_init__(self):
        self.latent_scales = tuple(int(v) for v in self.latent_scales)
        self.latent_width = tuple(int(v) for v in self.latent_width)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        if self.likelihood == "logistic_mixture" and self.image_channels not in (1, 3):
            raise ValueError("logistic_mixture likelihood supports 1 or 3 image channels")
        for name in ("image_channels", "image_size", "num_mix", "num_ch", "enc_blocks_per_scale",
                     "dec_blocks_per_scale", "unet_channels", "batch_size", "test_batch_size",
                     "epochs", "val_size", "is_k", "dct_scale_images"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("unet_res_blocks", "warmup_epochs", "max_consecutive_skips", "weight_decay",
                     "adam_eps", "eta_min", "grad_clip", "grad_skip_thr", "beta"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not (self.grad_skip_factor == 0 or self.grad_skip_factor > 1):
            raise ValueError(f"grad_skip_factor must be 0 (off) or > 1, got {self.grad_skip_factor}")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate must be in [0, 1), got {self.ema_rate}")
        if len(self.latent_scales) != len(self.latent_width):
            raise ValueError(
                f"latent_scales {self.latent_scales} and latent_width {self.latent_width} "
                "must have the same length")
        if not self.latent_scales or min(self.latent_scales) < 1:
            raise ValueError(f"every entry of latent_scales must be >= 1, got {self.latent_scales}")
        if len(set(self.latent_width)) != 1:
            raise ValueError("all latent_width entries must be equal: the likelihood sums the "
                             f"upsampled latents, got {self.latent_width}")
        if not 1 <= self.ctx_size <= self.image_size:
            raise ValueError(f"ctx_size must be in [1, image_size], got {self.ctx_size}")
        n_down = len(self.latent_scales) - (1 if self.start_scale_at_x else 0)
        if self.image_size % (2 ** n_down) != 0:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**{n_down} "
                "(one pooling per latent scale)")
        if self.diffusion_steps <= 0:
            raise ValueError(f"diffusion_steps must be positive, got {self.diffusion_steps}")
        if not self.gamma_min < self.gamma_max:
            raise ValueError("gamma_min must be smaller than gamma_max")
        if self.unet_channels % 16 != 0:
            raise ValueError("unet_channels must be a multiple of 16 (GroupNorm with 16 groups)")
        # Fields of the research code's configs that this model does not implement: every
        # paper config uses the value below, so any other value is rejected, not ignored.
        if self.num_postprocess_blocks != 0:
            raise ValueError(f"num_postprocess_blocks must be 0, got {self.num_postprocess_blocks}: the "
                             "decoder has no post-processing ResBlocks (every paper config uses 0)")
        if self.unet_heads != 1:
            raise ValueError(f"unet_heads must be 1, got {self.unet_heads}: the UNet's middle "
                             "self-attention is single-head (every paper config uses 1)")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_size, self.image_size)

    @property
    def num_ladder_latents(self) -> int:
        return sum(self.latent_scales)

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with ``overrides`` applied; unknown keys raise."""
        check_keys(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latent_scales"] = list(self.latent_scales)
        d["latent_width"] = list(self.latent_width)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        check_keys(d)
        return cls(**d)


def check_keys(d: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise KeyError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")


PRESETS: dict[str, Config] = {
    "mnist": Config(),
    "omniglot": Config(
        dataset="omniglot", ctx_size=5, num_ch=80, block_ch_mult=0.5,
        unet_channels=32, unet_res_blocks=3, unet_dropout=0.05, diffusion_steps=50,
        test_batch_size=1000, epochs=500, eta_min=1e-4, grad_clip=2.0, val_size=1000),
    "cifar10": Config(
        dataset="cifar10", image_channels=3, image_size=32, likelihood="logistic_mixture",
        num_mix=10, latent_scales=(10, 8, 6, 4), latent_width=(3, 3, 3, 3), num_ch=128,
        block_ch_mult=0.75, start_scale_at_x=True, standardize_input=True, enc_blocks_per_scale=4,
        unet_channels=32, unet_res_blocks=3, gamma_min=-10.0, batch_size=128,
        test_batch_size=512, lr=3e-3, epochs=3000, warmup_epochs=5, eta_min=1e-4,
        grad_clip=150.0, val_size=5000),
    # A few-thousand-parameter model with the MNIST structure, for fast tests.
    "tiny": Config(
        dataset="mnist", num_ch=16, latent_scales=(2, 1), enc_blocks_per_scale=1,
        ctx_size=5, unet_channels=16, unet_res_blocks=1, diffusion_steps=5,
        batch_size=16, test_batch_size=16, val_size=16, is_k=8, dct_scale_images=512),
}


def get_config(preset: str | Config, **overrides: Any) -> Config:
    """Return the named preset (or a copy of a Config) with ``overrides`` applied."""
    if isinstance(preset, Config):
        base = preset
    else:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; available presets: {sorted(PRESETS)}")
        base = PRESETS[preset]
    return base.replace(**overrides)
