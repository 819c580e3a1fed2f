"""Likelihoods p(x|z) (MODEL.md section 6): Bernoulli and a discretized logistic mixture."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dvpvae.noise import Noise

BERNOULLI_EPS = 1e-7
NUM_BINS = 256
UNIFORM_EPS = 1e-5


class Bernoulli:
    """Pixel-wise Bernoulli on sigmoid outputs, probabilities clamped to [1e-7, 1-1e-7]."""

    def __init__(self, cfg):
        self.num_channels = cfg.image_channels

    def out_channels(self) -> int:
        return self.num_channels

    def probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(h).clamp(BERNOULLI_EPS, 1 - BERNOULLI_EPS)

    def target(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        """Dynamic binarization of x in [-1,1]: a fresh Bernoulli((x+1)/2) draw."""
        u = noise.uniform("binarize", x.shape, x)
        return (u < (x + 1) * 0.5).to(x.dtype)

    def log_prob(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | h) summed per example, target in {0, 1}."""
        p = self.probs(h)
        lp = target * torch.log(p) + (1 - target) * torch.log(1 - p)
        return lp.flatten(1).sum(-1)

    def sample(self, h: torch.Tensor, noise: Noise) -> torch.Tensor:
        """The mean image mapped to [-1, 1] (the research code's choice for binary data)."""
        return 2 * self.probs(h) - 1


class LogisticMixture:
    """Discretized mixture of logistics over 256 bins with RGB autoregressive means.

    Output layout (num_mix * (3C + 1) channels): M mixture logits, then for each image
    channel c the blocks [means (M), log-scales (M), AR coefficients (M)].
    """

    def __init__(self, cfg):
        self.num_channels, self.num_mix = cfg.image_channels, cfg.num_mix

    def out_channels(self) -> int:
        return self.num_mix * (3 * self.num_channels + 1)

    def params(self, h: torch.Tensor):
        n, _, H, W = h.shape
        m, c = self.num_mix, self.num_channels
        logits = h[:, :m]
        rest = h[:, m:].reshape(n, c, 3 * m, H, W)
        means, log_scales, coeffs = rest.chunk(3, dim=2)
        return logits, means, log_scales.clamp(-8.0, 1.0), torch.tanh(coeffs)

    def target(self, x: torch.Tensor, noise: Noise) -> torch.Tensor:
        return x

    @staticmethod
    def _ar_means(means, coeffs, x):
        """Means of channel c shifted by coefficient-weighted earlier channels of x."""
        if means.shape[1] == 1:
            return means
        x = x.unsqueeze(2)
        m1 = means[:, 1:2] + coeffs[:, 0:1] * x[:, 0:1]
        m2 = means[:, 2:3] + coeffs[:, 1:2] * x[:, 0:1] + coeffs[:, 2:3] * x[:, 1:2]
        return torch.cat([means[:, 0:1], m1, m2], dim=1)

    def log_prob(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, means, log_scales, coeffs = self.params(h)
        means = self._ar_means(means, coeffs, x)
        xe = x.unsqueeze(2)
        centered = xe - means
        inv_s = torch.exp(-log_scales)
        half_bin = 1.0 / (NUM_BINS - 1)
        plus_in = inv_s * (centered + half_bin)
        min_in = inv_s * (centered - half_bin)
        log_delta = torch.log(torch.clamp(torch.sigmoid(plus_in) - torch.sigmoid(min_in), min=1e-10))
        log_cdf_plus = plus_in - F.softplus(plus_in)  # edge bin 0: CDF up to its upper edge
        log_sf_min = -F.softplus(min_in)  # edge bin 255: survival from its lower edge
        lp = torch.where(xe <= -1 + half_bin, log_cdf_plus, torch.where(xe >= 1 - half_bin, log_sf_min, log_delta))
        lp = lp.sum(1) + F.log_softmax(logits, dim=1)
        return torch.logsumexp(lp, dim=1).flatten(1).sum(-1)

    def sample(self, h: torch.Tensor, noise: Noise) -> torch.Tensor:
        logits, means, log_scales, coeffs = self.params(h)
        g = noise.uniform("mix_component", logits.shape, logits, UNIFORM_EPS, 1 - UNIFORM_EPS)
        pick = F.one_hot(torch.argmax(logits - torch.log(-torch.log(g)), dim=1), self.num_mix)
        pick = pick.movedim(-1, 1).unsqueeze(1).to(means.dtype)
        mu, ls, co = ((v * pick).sum(2) for v in (means, log_scales, coeffs))
        u = noise.uniform("mix_logistic", mu.shape, mu, UNIFORM_EPS, 1 - UNIFORM_EPS)
        x = mu + torch.exp(ls) * (torch.log(u) - torch.log(1 - u))
        if x.shape[1] == 1:
            return x.clamp(-1, 1)
        x0 = x[:, 0:1].clamp(-1, 1)
        x1 = (x[:, 1:2] + co[:, 0:1] * x0).clamp(-1, 1)
        x2 = (x[:, 2:3] + co[:, 1:2] * x0 + co[:, 2:3] * x1).clamp(-1, 1)
        return torch.cat([x0, x1, x2], dim=1)


def make_likelihood(cfg):
    return {"bernoulli": Bernoulli, "logistic_mixture": LogisticMixture}[cfg.likelihood](cfg)
