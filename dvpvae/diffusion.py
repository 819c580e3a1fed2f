"""Continuous-time diffusion prior p(u) over the pseudoinputs (MODEL.md section 5).

Linear log-SNR schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t with
alpha_t^2 = sigmoid(-gamma), sigma_t^2 = sigmoid(gamma). -log p(u) is bounded by
L_0 + L_diff + L_T, each returned per element so callers can inspect the terms.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import nn

from dvpvae.config import Config
from dvpvae.kernels.ddpm_step import ddpm_coefficients
from dvpvae.noise import Noise, as_noise
from dvpvae.ops import REFERENCE, ReferenceOps
from dvpvae.unet import UNet

LOG_2PI = math.log(2 * math.pi)


def check_steps(steps) -> int:
    """``steps`` if it is a positive int (a number of prior sampling steps), else ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"the number of prior sampling steps must be a positive integer, got {steps!r}")
    return int(steps)


def forward_chain_coefficients(T: int, gamma_min: float, gamma_max: float) -> torch.Tensor:
    """The (T + 1, 2) float64 table of the forward chain q(z_0, z_{1/T}, ..., z_1 | u)
    (MODEL.md section 7), columns [scale, std]: row 0 is q(z_0 | u) = N(alpha_0 u, sigma_0^2),
    row i >= 1 is q(z_t | z_s) = N(a_ts z_s, sigma_ts^2) for s = (i-1)/T, t = i/T."""
    g = gamma_min + (gamma_max - gamma_min) * torch.arange(T + 1, dtype=torch.float64) / T
    log_alpha2 = -torch.nn.functional.softplus(g)  # log sigmoid(-g), accurate for large gamma
    scale = torch.exp(0.5 * torch.cat([log_alpha2[:1], log_alpha2[1:] - log_alpha2[:-1]]))
    # sigma_ts^2 = sigma_t^2 - a_ts^2 sigma_s^2 = sigma_t^2 (1 - exp(gamma_s - gamma_t))
    var = torch.cat([torch.sigmoid(g[:1]), torch.sigmoid(g[1:]) * -torch.expm1(g[:-1] - g[1:])])
    return torch.stack([scale, var.sqrt()], dim=1)


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
        self.register_buffer("chain_coefficients", forward_chain_coefficients(T, gamma_min, gamma_max).float(),
                             persistent=False)
        self._step_tables: dict[tuple, torch.Tensor] = {}  # step_table(S) for S != T

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
                     keep: torch.Tensor | None = None, ops: ReferenceOps = REFERENCE) -> torch.Tensor:
        """0.5 gamma'(t) ||eps - eps_hat(z_t, t)||^2 per element, t of shape (N,); without
        dropout masks ``keep`` eps_hat comes from ``ops.unet_eps``."""
        g = self.gamma(t)[:, None, None, None]
        z_t = torch.sigmoid(-g).sqrt() * u + torch.sigmoid(g).sqrt() * eps
        eps_hat = self.unet(z_t, t, keep) if keep is not None else ops.unet_eps(self.unet, z_t, t)
        return self.weighted_error(eps, eps_hat)

    def weighted_error(self, eps: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        """0.5 gamma'(t) ||eps - eps_hat||^2 per element (N, D)."""
        w = 0.5 * (self.gamma_max - self.gamma_min)
        return (w * (eps - eps_hat) ** 2).flatten(1)

    def reconstruction_term(self, u: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """L_0 = -log N(u; z_0 / alpha_0, exp(gamma_min)) per element (N, D); also the last
        factor p(u | z_0) of the T-step model."""
        g0 = torch.full((), self.gamma_min, dtype=u.dtype, device=u.device)
        a0 = torch.sigmoid(-g0).sqrt()
        return (0.5 * (LOG_2PI + g0 + (u - z0 / a0) ** 2 / torch.exp(g0))).flatten(1)

    def terminal_term(self, u: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(z_1 | u) || N(0, I)) per element (N, D)."""
        g1 = torch.full((), self.gamma_max, dtype=u.dtype, device=u.device)
        a2_1, s2_1 = torch.sigmoid(-g1), torch.sigmoid(g1)
        return (0.5 * (a2_1 * u ** 2 + s2_1 - torch.log(s2_1) - 1.0)).flatten(1)

    def neg_log_prob(self, u: torch.Tensor, noise: Noise, full: bool, ops: ReferenceOps = REFERENCE) -> PriorTerms:
        """Bound on -log p(u): single random t if ``full`` is False, else the T-point average."""
        n = u.shape[0]
        g0 = torch.full((), self.gamma_min, dtype=u.dtype, device=u.device)
        eps0 = noise.normal("diffusion_eps0", u.shape, u)
        a0, s0 = torch.sigmoid(-g0).sqrt(), torch.sigmoid(g0).sqrt()
        L0 = self.reconstruction_term(u, a0 * u + s0 * eps0)
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
            Ldiff = self.weighted_mse(u, t, eps, keep, ops)
        return PriorTerms(L0, Ldiff, self.terminal_term(u))

    def _full_diffusion_loss(self, u: torch.Tensor, noise: Noise, ops: ReferenceOps) -> torch.Tensor:
        """Average weighted MSE over t = 1/T, ..., 1, all T UNet calls in one batch."""
        n, T = u.shape[0], self.T
        eps = noise.normal("diffusion_eps", (T,) + tuple(u.shape), u)
        t = (torch.arange(1, T + 1, dtype=u.dtype, device=u.device) / T).repeat_interleave(n)
        u_rep = u.unsqueeze(0).expand(T, *u.shape).reshape(T * n, *u.shape[1:])
        per_step = self.weighted_mse(u_rep, t, eps.reshape(T * n, *u.shape[1:]), None, ops)
        return per_step.reshape(T, n, -1).mean(0)

    def forward_chain(self, u: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward trajectory of u with the noise ``eps`` (T+1, N, ...): z (T+1, N, ...),
        row i at t = i/T (``forward_chain_coefficients``), and log q(z_0..z_1 | u) (N,)."""
        scale, std = self.chain_coefficients.to(u.dtype).unbind(1)
        zs, z = [], u
        for i in range(self.T + 1):
            z = scale[i] * z + std[i] * eps[i]
            zs.append(z)
        log_q = -0.5 * (LOG_2PI + eps ** 2).sum(0).flatten(1).sum(-1) - u[0].numel() * std.log().sum()
        return torch.stack(zs), log_q

    def trajectory_terms(self, u: torch.Tensor, eps: torch.Tensor,
                         ops: ReferenceOps = REFERENCE) -> tuple[torch.Tensor, PriorTerms]:
        """Importance weight of u's forward trajectory (MODEL.md section 7) and the T-point
        bound at the same trajectory, sharing the T UNet evaluations.

        Returns log p(u, z_0..z_1) - log q(z_0..z_1 | u) per example (N,) for the T-step model
        that ``sample`` draws from by default (z_1 ~ N(0, I), T ancestral steps at temperature
        1, then u ~ N(z_0 / alpha_0, exp(gamma_min))), and the bound's terms: each z_t of the chain
        has the marginal N(alpha_t u, sigma_t^2) the bound draws from, so they are one
        random draw of the T-point bound (its T noises correlated along the chain).
        """
        n, T = u.shape[0], self.T
        z, log_q = self.forward_chain(u, eps)
        t = (torch.arange(1, T + 1, dtype=u.dtype, device=u.device) / T).repeat_interleave(n)
        z_t = z[1:].reshape(T * n, *u.shape[1:])  # all T UNet calls in one batch, t-major
        eps_hat = ops.unet_eps(self.unet, z_t, t)
        steps = eps_hat.view(T, *u.shape)
        coef = self.coefficients.to(u.dtype)
        c_noise = coef[:, 4]  # the table's last column: the step's noise scale
        log_p = -0.5 * (LOG_2PI + z[T] ** 2).flatten(1).sum(-1)
        for i in range(T):  # the sampler's step t = (i+1)/T -> s = i/T is N(its mean, c_noise^2)
            mean = ops.ddpm_step(z[i + 1], steps[i], torch.zeros_like(u), coef, i, 0.0)
            r = (z[i] - mean) / c_noise[i]
            log_p = log_p - (0.5 * (LOG_2PI + r ** 2) + c_noise[i].log()).flatten(1).sum(-1)
        L0 = self.reconstruction_term(u, z[0])
        g = self.gamma(t)[:, None, None, None]
        eps_t = (z_t - torch.sigmoid(-g).sqrt() * u.repeat(T, 1, 1, 1)) / torch.sigmoid(g).sqrt()
        Ldiff = self.weighted_error(eps_t, eps_hat).reshape(T, n, -1).mean(0)
        return log_p - L0.sum(-1) - log_q, PriorTerms(L0, Ldiff, self.terminal_term(u))

    def step_table(self, steps: int) -> torch.Tensor:
        """The (steps, 5) coefficient table of the grid t_i = i/steps (row i: t = (i+1)/steps
        -> s = i/steps) in the dtype and on the device of ``coefficients``, which it is for
        steps = T. The prior is continuous-time, so any positive number of steps samples it."""
        check_steps(steps)
        c = self.coefficients
        if steps == self.T:
            return c
        # Kept: a sampler captured in a CUDA graph finds its table on the device (a host copy
        # cannot be recorded), and repeated calls copy nothing.
        key = (steps, c.dtype, c.device)
        if key not in self._step_tables:
            self._step_tables[key] = ddpm_coefficients(steps, self.gamma_min, self.gamma_max).to(c)
        return self._step_tables[key]

    def sampling_noise(self, n: int, noise: Noise | dict | None = None,
                       steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The draws of ancestral sampling through ``steps`` steps (default T): z_1
        ("prior_zT", (n,) + shape) and the per-step noise ("prior_eps", (steps, n) + shape;
        row k is used at the k-th step, t = 1 first)."""
        if n < 1:
            raise ValueError(f"number of samples must be positive, got {n}")
        steps = self.T if steps is None else check_steps(steps)
        noise = as_noise(noise)
        like = self.coefficients
        z = noise.normal("prior_zT", (n,) + self.shape, like)
        eps = noise.normal("prior_eps", (steps, n) + self.shape, like)
        return z, eps

    def step(self, z_t: torch.Tensor, i: int, eps: torch.Tensor, temperature: float,
             ops: ReferenceOps = REFERENCE, table: torch.Tensor | None = None) -> torch.Tensor:
        """One ancestral step from t = (i+1)/S to s = i/S (MODEL.md section 5) with row i of
        ``table`` (S rows, ``step_table(S)``; default the T-step ``coefficients``)."""
        table = self.coefficients if table is None else table
        t = torch.full((z_t.shape[0],), (i + 1) / table.shape[0], dtype=z_t.dtype, device=z_t.device)
        return ops.ddpm_step(z_t, self.unet(z_t, t), eps, table, i, temperature)

    def sample_loop(self, z: torch.Tensor, eps: torch.Tensor, temperature: float,
                    ops: ReferenceOps = REFERENCE) -> torch.Tensor:
        """The S ancestral steps from z_1 = ``z`` with the per-step noise ``eps`` (S, n, ...):
        its rows set the number of steps."""
        table = self.step_table(eps.shape[0])
        for k, i in enumerate(range(table.shape[0] - 1, -1, -1)):
            z = self.step(z, i, eps[k], temperature, ops, table)
        return z

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise: Noise | dict | None = None,
               ops: ReferenceOps = REFERENCE, steps: int | None = None) -> torch.Tensor:
        """n pseudoinputs by ancestral sampling through ``steps`` steps on the grid
        t_i = i/steps (default T, the grid the prior was trained on); ``temperature`` scales
        the per-step noise. The reference provider runs the Python loop."""
        return ops.sample_prior(self, n, temperature, noise, steps)
