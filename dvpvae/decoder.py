"""Top-down decoder with the pseudoinput context (MODEL.md sections 2 and 4).

The decoder runs from the coarsest latent down. The first "layer" is the pseudoinput u
(a DCT block of the image, prior = the diffusion model); every ladder latent z_l is
conditioned on the image-space rendering of u, average-pooled to its resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dvpvae.blocks import ResBlock, stable_init_factor
from dvpvae.config import Config
from dvpvae.dct import safe_scale
from dvpvae.diffusion import LOG_2PI, DiffusionPrior
from dvpvae.encoder import scale_channels
from dvpvae.kernels.reparam_kl import MAX_LOGVAR
from dvpvae.noise import Noise
from dvpvae.ops import ReferenceOps

# Range of the pseudoinput posterior's log-variance (the research code's clamp).
Q_LOGVAR_RANGE = (-12.0, -5.0)


@dataclass
class Layer:
    """One stochastic layer: the sample and the (clamped) posterior/prior parameters.

    For the pseudoinput layer ``p_mu``/``p_logvar`` are None (its prior is the diffusion
    model) and ``kl`` is the single-sample log q(u|x) - log p(u).
    """

    z: torch.Tensor
    q_mu: torch.Tensor | None = None
    q_logvar: torch.Tensor | None = None
    p_mu: torch.Tensor | None = None
    p_logvar: torch.Tensor | None = None
    kl: torch.Tensor | None = None


def gaussian_log_density(z, mu, logvar) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed per example."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu) ** 2 * torch.exp(-logvar))).flatten(1).sum(-1)


class PseudoinputBlock(nn.Module):
    """q(u|x) = N(DCT pseudoinput of x, exp(q_logvar)) with the diffusion prior p(u)."""

    def __init__(self, cfg: Config):
        super().__init__()
        c, k = cfg.image_channels, cfg.ctx_size
        self.ctx_size, self.image_size = k, (cfg.image_size, cfg.image_size)
        self.prior = DiffusionPrior.from_config(cfg)
        self.q_logvar = nn.Parameter(torch.full((1, c, k, k), float(cfg.gamma_min)))
        # Filled from training data by dvpvae.set_dct_scale; ones until then.
        self.register_buffer("dct_scale", torch.ones(c, k, k))

    def posterior_logvar(self) -> torch.Tensor:
        """q_logvar clamped to [-12, -5] with an identity gradient.

        The research code clamps the parameter's data in place on every forward, so its
        gradient never sees the clamp; the trainer projects the parameter after each step
        (``DVPVAE.constrain_``) to keep the two behaviours identical.
        """
        lv = self.q_logvar
        return lv + (lv.clamp(*Q_LOGVAR_RANGE) - lv).detach()

    def mean(self, x: torch.Tensor, ops: ReferenceOps) -> torch.Tensor:
        return ops.dct(x, safe_scale(self.dct_scale), self.ctx_size)

    def to_image(self, u: torch.Tensor, ops: ReferenceOps) -> torch.Tensor:
        return ops.idct(u, safe_scale(self.dct_scale), self.image_size)

    def forward(self, x: torch.Tensor, noise: Noise, full_bound: bool | None, ops: ReferenceOps):
        mu = self.mean(x, ops)
        lv = self.posterior_logvar().expand_as(mu)
        eps = noise.normal("u", mu.shape, mu)
        u = mu + torch.exp(0.5 * lv) * eps
        if full_bound is None:  # the caller evaluates the prior itself (importance sampling)
            return Layer(z=u, q_mu=mu, q_logvar=lv), None
        log_q = (-0.5 * (LOG_2PI + lv + eps ** 2)).flatten(1).sum(-1)
        terms = self.prior.neg_log_prob(u, noise, full_bound, ops)
        return Layer(z=u, q_mu=mu, q_logvar=lv, kl=log_q + terms.neg_log_p), terms


class LadderBlock(nn.Module):
    """One ladder latent: prior and posterior nets, then the deterministic update of s_dec."""

    def __init__(self, in_ch: int, out_ch: int, width: int, cond_ch: int, cfg: Config,
                 upsample_to: int | None, has_resnet: bool):
        super().__init__()
        self.width, self.min_logvar = width, cfg.min_logvar
        self.upsample_to = upsample_to
        hid = int(in_ch * cfg.block_ch_mult)
        self.prior_net = ResBlock(in_ch + cond_ch, hid, 2 * width + in_ch, cfg.activation,
                                  pre_activation=False, zero_last=True)
        self.posterior_net = ResBlock(in_ch, max(hid, 1), 2 * width, cfg.activation,
                                      pre_activation=False, zero_last=True)
        self.z_proj = nn.Conv2d(width, in_ch, 1)
        blocks = []
        if has_resnet:
            for b in range(cfg.dec_blocks_per_scale):
                last = b + 1 == cfg.dec_blocks_per_scale
                blocks.append(ResBlock(in_ch, hid, out_ch if last else in_ch, cfg.activation,
                                       pre_activation=False))
        self.resnet = nn.ModuleList(blocks)
        factor = stable_init_factor(cfg.num_ladder_latents)
        if blocks:
            blocks[-1].scale_last_(factor)
        with torch.no_grad():
            self.z_proj.weight.mul_(factor)

    def prior_params(self, s_dec: torch.Tensor, cond: torch.Tensor, ops: ReferenceOps):
        out = self.prior_net(torch.cat([s_dec, cond], dim=1), ops)
        w = self.width
        return out[:, :w], out[:, w:2 * w], out[:, 2 * w:]

    def posterior_params(self, s_enc: torch.Tensor, s_dec: torch.Tensor, ops: ReferenceOps):
        out = self.posterior_net((s_enc + s_dec) / math.sqrt(2), ops)
        return out[:, :self.width], out[:, self.width:]

    def update(self, s_dec: torch.Tensor, z: torch.Tensor, ops: ReferenceOps) -> torch.Tensor:
        s_dec = s_dec + ops.project(z, self.z_proj)
        for block in self.resnet:
            s_dec = block(s_dec, ops)
        if self.upsample_to is not None:
            s_dec = ops.upsample(s_dec, self.upsample_to)
        return s_dec

    def encode(self, s_enc, s_dec, cond, eps, is_last, ops: ReferenceOps):
        """Posterior pass: z ~ q, analytic KL(q || p); returns (Layer, next s_dec)."""
        p_mu, p_lv, h = self.prior_params(s_dec, cond, ops)
        q_mu, q_lv = self.posterior_params(s_enc, s_dec, ops)
        z, kl = ops.reparam_kl(q_mu, q_lv, p_mu, p_lv, eps, self.min_logvar)
        layer = Layer(z, q_mu, q_lv.clamp(self.min_logvar, MAX_LOGVAR), p_mu,
                      p_lv.clamp(self.min_logvar, MAX_LOGVAR), kl)
        return layer, (None if is_last else self.update(s_dec + h, z, ops))

    def generate(self, s_dec, cond, eps, temperature, is_last, ops: ReferenceOps, z=None):
        """Prior pass: z ~ p with its variance scaled by ``temperature``, or a given ``z``
        (``eps`` unused) that the state update follows instead."""
        p_mu, p_lv, h = self.prior_params(s_dec, cond, ops)
        if z is None:
            z = ops.reparam_sample(p_mu, p_lv, eps, self.min_logvar, temperature)
        return z, (None if is_last else self.update(s_dec + h, z, ops))


class TopDownDecoder(nn.Module):
    """Pseudoinput block, ladder blocks top -> bottom, latent aggregation and output conv."""

    def __init__(self, cfg: Config, out_channels: int):
        super().__init__()
        self.cfg = cfg
        chans = scale_channels(cfg)[::-1]
        scales, widths = cfg.latent_scales[::-1], cfg.latent_width[::-1]
        n = len(scales)
        top = (2 * cfg.image_size if cfg.start_scale_at_x else cfg.image_size) // 2 ** n
        self.top_shape = (chans[0], top, top)
        self.pseudoinput = PseudoinputBlock(cfg)
        self.blocks = nn.ModuleList()
        self.resolutions: list[int] = []
        self.latent_shapes: list[tuple[int, int, int]] = []
        res = top
        for s, (count, w) in enumerate(zip(scales, widths)):
            next_res = cfg.image_size if s + 1 == n else res * 2
            for j in range(count):
                last_of_scale = j + 1 == count
                out_ch = chans[s + 1] if (last_of_scale and s + 1 < n) else chans[s]
                is_last = last_of_scale and s + 1 == n
                self.blocks.append(LadderBlock(chans[s], out_ch, w, cfg.image_channels, cfg,
                                               next_res if last_of_scale else None,
                                               has_resnet=not is_last))
                self.resolutions.append(res)
                self.latent_shapes.append((w, res, res))
            res = next_res
        self.z_to_features = nn.Conv2d(widths[0], chans[-1], 1)
        self.out_conv = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def condition(self, image: torch.Tensor, res: int) -> torch.Tensor:
        k = image.shape[-1] // res
        return image if k == 1 else F.avg_pool2d(image, k)

    def aggregate(self, zs: list[torch.Tensor], ops: ReferenceOps) -> torch.Tensor:
        """Likelihood parameters from the sum of upsampled ladder latents / sqrt(L)."""
        size = self.cfg.image_size
        a = sum(ops.upsample(z, size) for z in zs)
        return ops.head(a / math.sqrt(len(zs)), self.z_to_features, self.out_conv)

    def initial_state(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.ones((n,) + self.top_shape, dtype=like.dtype, device=like.device)

    def forward(self, x: torch.Tensor, enc_feats: list[torch.Tensor], noise: Noise, full_bound: bool | None,
                ops: ReferenceOps):
        """Posterior pass. Returns (likelihood params, layers [u, z_top .. z_bottom], prior terms).

        ``full_bound``: the T-point bound on -log p(u) (True), the single-t one (False), or no
        prior term at all (None: u's ``kl`` and the prior terms are None)."""
        u_layer, terms = self.pseudoinput(x, noise, full_bound, ops)
        image = self.pseudoinput.to_image(u_layer.z, ops)
        s_dec = self.initial_state(x.shape[0], x)
        layers = [u_layer]
        feats = enc_feats[::-1]
        for l, block in enumerate(self.blocks):
            cond = self.condition(image, self.resolutions[l])
            eps = noise.normal(f"z{l}", (x.shape[0],) + self.latent_shapes[l], x)
            layer, s_dec = block.encode(feats[l], s_dec, cond, eps, l + 1 == len(self.blocks), ops)
            layers.append(layer)
        return self.aggregate([lay.z for lay in layers[1:]], ops), layers, terms

    def generate(self, u: torch.Tensor, noise: Noise, temperatures, ops: ReferenceOps,
                 given=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prior pass from a pseudoinput u: the top ``len(given)`` ladder latents are
        ``given``, each other z_l is drawn from its prior (draw "z{l}") with the variance
        scaled by ``temperatures[l]``. Returns (likelihood parameters, ladder latents top ->
        bottom)."""
        if len(given) == len(self.blocks):  # the likelihood sees the ladder latents only
            return self.aggregate(list(given), ops), list(given)
        image = self.pseudoinput.to_image(u, ops)
        s_dec = self.initial_state(u.shape[0], u)
        zs = []
        for l, block in enumerate(self.blocks):
            cond = self.condition(image, self.resolutions[l])
            is_last = l + 1 == len(self.blocks)
            if l < len(given):
                z, s_dec = block.generate(s_dec, cond, None, None, is_last, ops, z=given[l])
            else:
                eps = noise.normal(f"z{l}", (u.shape[0],) + self.latent_shapes[l], u)
                z, s_dec = block.generate(s_dec, cond, eps, temperatures[l], is_last, ops)
            zs.append(z)
        return self.aggregate(zs, ops), zs
