"""Continuous-time diffusion prior p(u) over the pseudoinputs (MODEL.md section 5).

Linear log-SNR schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t with
alpha_t^2 = sigmoid(-gamma), sigma_t^2 = sigmoid(gamma). -log p(u) is bounded by
L_0 + L_diff + L_T, each returned per element so callers can inspect the terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dvpvae.config import Config
from dvpvae.kernels.ddpm_step import ddpm_coefficients
from dvpvae.noise import Noise, as_noise
from dvpvae.ops import REFERENCE, ReferenceOps
from dvpvae.unet import UNet

LOG_2PI = math.log(2 * math.pi)


@dataclass
class PriorTerms:
    """Per-element terms (N, D) of -log p(u); ``neg_log_p`` is their per-example sum (N,)."""

    L0: torch.Tensor
    Ldiff: torch.Tensor
    LT: torch.Tensor

    @property
    def neg_log_p(self) -> torch.Tensor:
        return (self.L0 + self.Ldiff + self.LT).sum(-1)


class DiffusionPrior(nn.Module):
    """p(u) with an eps-predicting UNet; ``neg_log_prob`` gives the bound, ``sample`` draws u."""

    def __init__(self, in_ch: int, size: int, T: int, gamma_min: float, gamma_max: float,
                 channels: int, num_res_blocks: int, dropout: float):
        super().__init__()
        self.in_ch, self.size, self.T = in_ch, size, T
        self.gamma_min, self.gamma_max = float(gamma_min), float(gamma_max)
        self.unet = UNet(in_ch, channels, num_res_blocks, dropout)
        # Tabulated once so the sampling loop never rebuilds schedules on the host.
        self.register_buffer("coefficients", ddpm_coefficients(T, gamma_min, gamma_max), persistent=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "DiffusionPrior":
        return cls(cfg.image_channels, cfg.ctx_size, cfg.diffusion_steps, cfg.gamma_min,
                   cfg.gamma_max, cfg.unet_channels, cfg.unet_res_blocks, cfg.unet_dropout)

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t.clamp(0.0, 1.0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.in_ch, self.size, self.size)

    @property
    def dropout(self) -> float:
        return self.unet.down[0].dropout.p if len(self.unet.down) else self.unet.mid1.dropout.p

    def dropout_shape(self, n: int) -> tuple[int, ...]:
        """Shape of the uniform draw behind the UNet's dropout masks for a batch of n."""
        return (self.unet.num_res_blocks_total, n, self.unet.channels, self.size, self.size)

    def weighted_mse(self, u: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                     keep: torch.Tensor | None = None) -> torch.Tensor:
        """0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2 per element, t of shape (N,)."""
        g = self.gamma(t)[:, None, None, None]
        z_t = torch.sigmoid(-g).sqrt() * u + torch.sigmoid(g).sqrt() * eps
        eps_hat = self.unet(z_t, t, keep)
        w = 0.5 * (self.gamma_max - self.gamma_min)
        return (w * (eps - eps_hat) ** 2).flatten(1)

    def neg_log_prob(self, u: torch.Tensor, noise: Noise, full: bool, ops: ReferenceOps = REFERENCE) -> PriorTerms:
        """Bound on -log p(u): single random t if ``full`` is False, else the T-point average."""
        n = u.shape[0]
        g0 = torch.full((), self.gamma_min, dtype=u.dtype, device=u.device)
        eps0 = noise.normal("diffusion_eps0", u.shape, u)
        a0, s0 = torch.sigmoid(-g0).sqrt(), torch.sigmoid(g0).sqrt()
        z0 = a0 * u + s0 * eps0
        # -log N(u; z0/alpha0, exp(gamma_min)) per element
        L0 = (0.5 * (LOG_2PI + g0 + (u - z0 / a0) ** 2 / torch.exp(g0))).flatten(1)
        if full:
            Ldiff = self._full_diffusion_loss(u, noise, ops)
        else:
            t = noise.uniform("diffusion_t", (n,), u)
            eps = noise.normal("diffusion_eps", u.shape, u)
            keep = None
            if self.training and self.dropout > 0:
                # Dropout is a random draw too: take it from the noise so it can be replayed.
                p = self.dropout
                keep = (noise.uniform("unet_dropout", self.dropout_shape(n), u) >= p).to(u.dtype) / (1 - p)
            Ldiff = ops.unet_mse(self, u, t, eps, keep)
        g1 = torch.full((), self.gamma_max, dtype=u.dtype, device=u.device)
        a2_1, s2_1 = torch.sigmoid(-g1), torch.sigmoid(g1)
        LT = (0.5 * (a2_1 * u ** 2 + s2_1 - torch.log(s2_1) - 1.0)).flatten(1)
        return PriorTerms(L0, Ldiff, LT)

    def _full_diffusion_loss(self, u: torch.Tensor, noise: Noise, ops: ReferenceOps) -> torch.Tensor:
        """Average weighted MSE over t = 1/T, ..., 1, all T UNet calls in one batch."""
        n, T = u.shape[0], self.T
        eps = noise.normal("diffusion_eps", (T,) + tuple(u.shape), u)
        t = (torch.arange(1, T + 1, dtype=u.dtype, device=u.device) / T).repeat_interleave(n)
        u_rep = u.unsqueeze(0).expand(T, *u.shape).reshape(T * n, *u.shape[1:])
        per_step = ops.unet_mse(self, u_rep, t, eps.reshape(T * n, *u.shape[1:]), None)
        return per_step.reshape(T, n, -1).mean(0)

    def sampling_noise(self, n: int, noise: Noise | dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws of ancestral sampling: z_1 ("prior_zT", (n,) + shape) and the per-step
        noise ("prior_eps", (T, n) + shape; row k is used at the k-th step, t = 1 first)."""
        if n < 1:
            raise ValueError(f"number of samples must be positive, got {n}")
        noise = as_noise(noise)
        like = self.coefficients
        z = noise.normal("prior_zT", (n,) + self.shape, like)
        eps = noise.normal("prior_eps", (self.T, n) + self.shape, like)
        return z, eps

    def step(self, z_t: torch.Tensor, i: int, eps: torch.Tensor, temperature: float,
             ops: ReferenceOps = REFERENCE) -> torch.Tensor:
        """One ancestral step from t = (i+1)/T to s = i/T (MODEL.md section 5)."""
        t = torch.full((z_t.shape[0],), (i + 1) / self.T, dtype=z_t.dtype, device=z_t.device)
        return ops.ddpm_step(z_t, self.unet(z_t, t), eps, self.coefficients, i, temperature)

    def sample_loop(self, z: torch.Tensor, eps: torch.Tensor, temperature: float,
                    ops: ReferenceOps = REFERENCE) -> torch.Tensor:
        """The T ancestral steps from z_1 = ``z`` with the per-step noise ``eps``."""
        for k, i in enumerate(range(self.T - 1, -1, -1)):
            z = self.step(z, i, eps[k], temperature, ops)
        return z

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise: Noise | dict | None = None,
               ops: ReferenceOps = REFERENCE) -> torch.Tensor:
        """n pseudoinputs by ancestral sampling through the T steps; ``temperature`` scales
        the per-step noise. The reference provider runs the Python loop."""
        return ops.sample_prior(self, n, temperature, noise)
