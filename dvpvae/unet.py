"""The small time-conditioned UNet eps_hat(z_t, t) of the diffusion prior (MODEL.md 5).

improved-diffusion style with channel_mult = (1,): no resolution changes, so the
"UNet" is an input conv, ``num_res_blocks`` ResBlocks, a ResBlock-Attention-ResBlock
middle, ``num_res_blocks + 1`` ResBlocks that each consume one stored activation by
channel concatenation, and a GroupNorm-SiLU-conv output head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 16


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of continuous t (N,) in [0,1] -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(t.dtype) if t.is_floating_point() else emb


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, ch)


class TimeResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM (scale, shift) from the time embedding, GroupNorm-SiLU-dropout-conv."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm_in = group_norm(in_ch)
        self.conv_in = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm_out = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def film_params(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """FiLM (scale, shift), each (N, out_ch), from the time embedding emb (N, emb_dim)."""
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        return scale, shift

    def forward(self, x: torch.Tensor, emb: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: an explicit dropout mask already scaled by 1/(1-p) (None: nn.Dropout)."""
        h = self.conv_in(F.silu(self.norm_in(x)))
        scale, shift = (p[..., None, None] for p in self.film_params(emb))
        h = F.silu(self.norm_out(h) * (1 + scale) + shift)
        h = self.dropout(h) if keep is None else h * keep
        return self.skip(x) + self.conv_out(h)


class SelfAttention(nn.Module):
    """Single-head self-attention over spatial positions with a residual connection."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = group_norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        q, k, v = self.qkv(self.norm(flat)).chunk(3, dim=1)
        attn = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
        out = torch.einsum("bij,bcj->bci", attn, v)
        return (flat + self.proj(out)).reshape(b, c, h, w)


class UNet(nn.Module):
    """eps_hat = UNet(z_t, t) for z_t (N, in_ch, s, s) and t (N,) in [0, 1]."""

    def __init__(self, in_ch: int, channels: int, num_res_blocks: int, dropout: float):
        super().__init__()
        self.in_ch, self.channels = in_ch, channels
        self.time_embed = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.input_conv = nn.Conv2d(in_ch, channels, 3, padding=1)
        self.down = nn.ModuleList(TimeResBlock(channels, channels, channels, dropout) for _ in range(num_res_blocks))
        self.mid1 = TimeResBlock(channels, channels, channels, dropout)
        self.mid_attn = SelfAttention(channels)
        self.mid2 = TimeResBlock(channels, channels, channels, dropout)
        self.up = nn.ModuleList(TimeResBlock(2 * channels, channels, channels, dropout)
                                for _ in range(num_res_blocks + 1))
        self.out_norm = group_norm(channels)
        self.out_conv = nn.Conv2d(channels, in_ch, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @property
    def num_res_blocks_total(self) -> int:
        """Number of dropout sites (one per time-conditioned ResBlock)."""
        return len(self.down) + 2 + len(self.up)

    def time_blocks(self) -> list[TimeResBlock]:
        """The time-conditioned blocks in forward order: down..., mid1, mid2, up..."""
        return [*self.down, self.mid1, self.mid2, *self.up]

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The time embedding (N, channels) of t (N,) that every TimeResBlock receives."""
        return self.time_embed(timestep_embedding(t, self.channels).to(dtype))

    def film_table(self, t: torch.Tensor) -> torch.Tensor:
        """(len(t), blocks, 2, channels): [1 + scale, shift] of each time block (``time_blocks``
        order) at each time of t, in t's dtype, as ``forward`` computes them."""
        emb = self.embed_time(t, t.dtype)
        films = []
        for b in self.time_blocks():
            scale, shift = b.film_params(emb)
            films.append(torch.stack([1 + scale, shift], dim=1))
        return torch.stack(films, dim=1)

    def forward(self, z: torch.Tensor, t: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``keep``: optional explicit dropout masks (blocks, N, channels, s, s), see TimeResBlock."""
        masks = iter(keep) if keep is not None else None

        def block(b, h):
            return b(h, emb, None if masks is None else next(masks))

        emb = self.embed_time(t, z.dtype)
        h = self.input_conv(z)
        stack = [h]
        for b in self.down:
            h = block(b, h)
            stack.append(h)
        h = block(self.mid2, self.mid_attn(block(self.mid1, h)))
        for b in self.up:
            h = block(b, torch.cat([h, stack.pop()], dim=1))
        return self.out_conv(F.silu(self.out_norm(h)))
