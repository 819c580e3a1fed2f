"""Residual blocks of the encoder and the top-down decoder (MODEL.md section 3)."""
from __future__ import annotations

import math

import torch
from torch import nn

from dvpvae.ops import ReferenceOps


class ResBlock(nn.Module):
    """out = skip(x) + gate * branch(x), a 1x1 -> 3x3 -> 3x3 -> 1x1 bottleneck.

    ``pre_activation=True`` (encoder) puts the activation before every conv;
    ``False`` (decoder, "2x3" mode) puts it after every conv but the last. Both reduce to
    a1 = act(conv_in(x')), a2 = act(conv_mid1(a1)), a3 = act(conv_mid2(a2)),
    out = skip(x) + gate * conv_out(a3) with x' = act(x) or x.
    The gate is a fixed buffer (1.0), kept so that checkpoints carry it.
    """

    def __init__(self, in_ch: int, hid_ch: int, out_ch: int, activation: str,
                 pre_activation: bool, zero_last: bool = False):
        super().__init__()
        self.pre_activation, self.activation = pre_activation, activation
        self.conv_in = nn.Conv2d(in_ch, hid_ch, 1)
        self.conv_mid1 = nn.Conv2d(hid_ch, hid_ch, 3, padding=1)
        self.conv_mid2 = nn.Conv2d(hid_ch, hid_ch, 3, padding=1)
        self.conv_out = nn.Conv2d(hid_ch, out_ch, 1)
        self.skip = None if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)
        self.register_buffer("gate", torch.ones(1))
        if zero_last:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, ops: ReferenceOps) -> torch.Tensor:
        act = self.activation
        h = ops.conv_act(ops.activate(x, act) if self.pre_activation else x, self.conv_in, act)
        h = ops.conv_act(h, self.conv_mid1, act)
        h = ops.conv_act(h, self.conv_mid2, act)
        skip = x if self.skip is None else ops.conv(x, self.skip)
        return ops.conv_residual(h, self.conv_out, skip, self.gate)

    def scale_last_(self, factor: float) -> None:
        """Shrink the last conv at init (stable deep ladders)."""
        with torch.no_grad():
            self.conv_out.weight.mul_(factor)


def stable_init_factor(num_latents: int) -> float:
    """Init scale of each block's residual output and z-projection: sqrt(1/L)."""
    return math.sqrt(1.0 / num_latents)
