"""Residual blocks of the encoder and the top-down decoder (MODEL.md section 3)."""
from __future__ import annotations

import math

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "gelu": nn.GELU}


def make_activation(name: str) -> nn.Module:
    """The activation module for a config name (relu, silu, elu, gelu)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class ResBlock(nn.Module):
    """out = skip(x) + gate * branch(x), a 1x1 -> 3x3 -> 3x3 -> 1x1 bottleneck.

    ``pre_activation=True`` (encoder) puts the activation before every conv;
    ``False`` (decoder, "2x3" mode) puts it after every conv but the last.
    The gate is a fixed buffer (1.0), kept so that checkpoints carry it.
    """

    def __init__(self, in_ch: int, hid_ch: int, out_ch: int, activation: str,
                 pre_activation: bool, zero_last: bool = False):
        super().__init__()
        self.pre_activation, self.activation = pre_activation, activation
        self.act = make_activation(activation)
        self.conv_in = nn.Conv2d(in_ch, hid_ch, 1)
        self.conv_mid1 = nn.Conv2d(hid_ch, hid_ch, 3, padding=1)
        self.conv_mid2 = nn.Conv2d(hid_ch, hid_ch, 3, padding=1)
        self.conv_out = nn.Conv2d(hid_ch, out_ch, 1)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.register_buffer("gate", torch.ones(1))
        if zero_last:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act
        if self.pre_activation:
            h = self.conv_in(act(x))
            h = self.conv_mid1(act(h))
            h = self.conv_mid2(act(h))
            return self.conv_out(act(h))
        h = act(self.conv_in(x))
        h = act(self.conv_mid1(h))
        h = act(self.conv_mid2(h))
        return self.conv_out(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.gate * self.branch(x)

    def scale_last_(self, factor: float) -> None:
        """Shrink the last conv at init (stable deep ladders)."""
        with torch.no_grad():
            self.conv_out.weight.mul_(factor)


def stable_init_factor(num_latents: int) -> float:
    """Init scale of each block's residual output and z-projection: sqrt(1/L)."""
    return math.sqrt(1.0 / num_latents)
