"""Bottom-up encoder ("small ladder", MODEL.md section 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvpvae.blocks import ResBlock
from dvpvae.config import Config
from dvpvae.ops import ReferenceOps

# Per-channel statistics of CIFAR10 training pixels in [0, 255], used by the research code.
CIFAR_MEAN, CIFAR_STD = 120.63838, 64.16736


def scale_channels(cfg: Config) -> list[int]:
    """Channels per latent scale, fine -> coarse: num_ch * scale_ch_mult**i (floored each step)."""
    chans = [cfg.num_ch]
    for _ in range(len(cfg.latent_scales) - 1):
        chans.append(int(chans[-1] * cfg.scale_ch_mult))
    return chans


class Encoder(nn.Module):
    """conv1x1 then, per latent scale: ResBlocks and 2x average pooling.

    Returns one feature map per ladder latent, fine -> coarse; the latents of one scale
    share their scale's map.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.standardize = cfg.standardize_input
        self.latent_scales = cfg.latent_scales
        chans = scale_channels(cfg)
        self.input_conv = nn.Conv2d(cfg.image_channels, chans[0], 1)
        self.scales = nn.ModuleList()
        # The first scale pools unless it starts at the image resolution.
        self.pools = [1 if cfg.start_scale_at_x else 2] + [2] * (len(cfg.latent_scales) - 1)
        for i in range(len(cfg.latent_scales)):
            blocks = []
            for b in range(cfg.enc_blocks_per_scale):
                in_ch = chans[i - 1] if (i > 0 and b == 0) else chans[i]
                blocks.append(ResBlock(in_ch, int(in_ch * cfg.block_ch_mult), chans[i],
                                       cfg.activation, pre_activation=True))
            self.scales.append(nn.ModuleList(blocks))

    def forward(self, x: torch.Tensor, ops: ReferenceOps) -> list[torch.Tensor]:
        if self.standardize:
            x = (x * 127.5 + 127.5 - CIFAR_MEAN) / CIFAR_STD
        d = ops.stem(x, self.input_conv)
        feats = []
        for blocks, pool, n in zip(self.scales, self.pools, self.latent_scales):
            for block in blocks:
                d = block(d, ops)
            if pool > 1:
                d = ops.block_layout(F.avg_pool2d(d, pool))
            feats.extend([d] * n)
        return feats
