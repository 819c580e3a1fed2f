"""The reference DVP-VAE: plain PyTorch, readable, the oracle for every fast path."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dvpvae.config import Config, get_config
from dvpvae.decoder import Q_LOGVAR_RANGE, Layer, TopDownDecoder, gaussian_log_density
from dvpvae.diffusion import PriorTerms
from dvpvae.encoder import Encoder
from dvpvae.likelihoods import make_likelihood
from dvpvae.noise import Noise, as_noise
from dvpvae.ops import ReferenceOps, get_ops


@dataclass
class DVPVAEOutput:
    """Result of a forward pass (all per-example values in nats).

    ``kl`` columns: pseudoinput u first, then ladder latents top (coarsest) -> bottom.
    """

    loss: torch.Tensor  # scalar, bits/dim: mean(rec + beta * kl.sum(-1)) / (ln2 * C*H*W)
    rec: torch.Tensor  # (N,) -log p(x|z)
    kl: torch.Tensor  # (N, L)
    elbo: torch.Tensor  # (N,) -(rec + kl.sum(-1))
    # Intermediates for inspection and parity tests; FastDVPVAE leaves them None.
    layers: list[Layer] | None = field(default=None, repr=False)
    prior_terms: PriorTerms | None = field(default=None, repr=False)
    likelihood_params: torch.Tensor | None = field(default=None, repr=False)



def check_images(x: torch.Tensor, cfg: Config) -> None:
    """Raise ValueError naming the problem if x is not a float (N,C,H,W) batch in [-1, 1]."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"images must be a floating-point tensor in [-1, 1], got dtype {x.dtype} "
                         "(convert uint8 with x / 127.5 - 1)")
    if x.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    c, h, w = cfg.image_shape
    if x.shape[1] != c:
        raise ValueError(f"images have {x.shape[1]} channels, the model expects {c}")
    if tuple(x.shape[2:]) != (h, w):
        raise ValueError(f"images have size {tuple(x.shape[2:])}, the model expects {(h, w)}")
    if x.shape[0] == 0:
        raise ValueError("images batch is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf")
    if bool((x.abs() > 1).any()):
        raise ValueError(f"images must lie in [-1, 1], got range [{x.min().item():.4g}, {x.max().item():.4g}]")


class DVPVAE(nn.Module):
    """Hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024).

    ``model(x, noise)`` returns a ``DVPVAEOutput``; train mode uses the single-t diffusion
    estimate of -log p(u), eval mode the T-point bound. See ``dvpvae.noise`` for the
    names of the random draws.

    ``ops`` names the op provider every block computes with (``dvpvae.ops``): "reference"
    (plain PyTorch, the default), "cpu" or "triton", or a provider instance.
    """

    def __init__(self, config: Config | str = "mnist", *, ops: str | ReferenceOps = "reference", **overrides):
        super().__init__()
        cfg = get_config(config, **overrides)
        self.config = cfg
        self.likelihood = make_likelihood(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = TopDownDecoder(cfg, self.likelihood.out_channels())
        self.ops = get_ops(ops)
        self.validate_inputs = True

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DVPVAE":
        """Build a model from a named preset (mnist, omniglot, cifar10, tiny) with config
        overrides (and the constructor's keyword options)."""
        return cls(name, **kwargs)

    def ops_for(self, device: torch.device) -> ReferenceOps:
        """The op provider for tensors on ``device``."""
        return self.ops

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def prior(self):
        """The diffusion prior p(u)."""
        return self.decoder.pseudoinput.prior

    @property
    def dct_scale(self) -> torch.Tensor:
        return self.decoder.pseudoinput.dct_scale

    @property
    def bits_per_nat(self) -> float:
        c, h, w = self.config.image_shape
        return 1.0 / (math.log(2) * c * h * w)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project constrained parameters back into range (call after each optimizer step)."""
        self.decoder.pseudoinput.q_logvar.clamp_(*Q_LOGVAR_RANGE)

    def forward_draws(self, n: int, like: torch.Tensor, noise: Noise, full_bound: bool) -> dict:
        """Every random draw of a forward pass over n images, in the reference order."""
        cfg = self.config
        u_shape = (n, cfg.image_channels, cfg.ctx_size, cfg.ctx_size)
        d = {"u": noise.normal("u", u_shape, like),
             "diffusion_eps0": noise.normal("diffusion_eps0", u_shape, like)}
        if full_bound:
            d["diffusion_eps"] = noise.normal("diffusion_eps", (cfg.diffusion_steps,) + u_shape, like)
        else:
            d["diffusion_t"] = noise.uniform("diffusion_t", (n,), like)
            d["diffusion_eps"] = noise.normal("diffusion_eps", u_shape, like)
            if self.training and self.prior.dropout > 0:
                d["unet_dropout"] = noise.uniform("unet_dropout", self.prior.dropout_shape(n), like)
        for l, shape in enumerate(self.decoder.latent_shapes):
            d[f"z{l}"] = noise.normal(f"z{l}", (n,) + shape, like)
        if cfg.likelihood == "bernoulli":
            d["binarize"] = noise.uniform("binarize", (n,) + cfg.image_shape, like)
        return d

    def forward(self, x: torch.Tensor, noise: Noise | dict | None = None) -> DVPVAEOutput:
        if self.validate_inputs:
            check_images(x, self.config)
        draws = self.forward_draws(x.shape[0], x, as_noise(noise), full_bound=not self.training)
        return self._forward_given_draws(x, draws)

    def _forward_given_draws(self, x: torch.Tensor, draws: dict) -> DVPVAEOutput:
        noise, ops = Noise(draws), self.ops_for(x.device)
        params, layers, terms = self.decoder(x, self.encoder(x, ops), noise, not self.training, ops)
        rec = -self.likelihood.log_prob(params, self.likelihood.target(x, noise))
        kl = torch.stack([lay.kl for lay in layers], dim=1)
        loss = (rec.mean() + self.config.beta * kl.sum(-1).mean()) * self.bits_per_nat
        return DVPVAEOutput(loss, rec, kl, -(rec + kl.sum(-1)), layers, terms, params)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise: Noise | dict | None = None,
               prior_temperature: float = 1.0) -> torch.Tensor:
        """Draw n images in [-1, 1].

        ``temperature`` scales the variance of the ladder latents' priors (as the research
        code's ``generate_x(t)``); ``prior_temperature`` scales the diffusion sampler noise.
        """
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        noise = as_noise(noise)
        u = self.sample_pseudoinputs(n, prior_temperature, noise)
        return self._decode_sample(u, self.sample_draws(n, u, noise), temperature)

    def sample_draws(self, n: int, like: torch.Tensor, noise: Noise) -> dict:
        """The draws of the decoding half of ``sample`` (after u), in the reference order."""
        cfg = self.config
        d = {f"z{l}": noise.normal(f"z{l}", (n,) + shape, like)
             for l, shape in enumerate(self.decoder.latent_shapes)}
        if cfg.likelihood == "logistic_mixture":
            h = w = cfg.image_size
            d["mix_component"] = noise.uniform("mix_component", (n, cfg.num_mix, h, w), like, 1e-5, 1 - 1e-5)
            d["mix_logistic"] = noise.uniform("mix_logistic", (n, cfg.image_channels, h, w), like, 1e-5, 1 - 1e-5)
        return d

    def _decode_sample(self, u: torch.Tensor, draws: dict, temperature: float) -> torch.Tensor:
        noise = Noise(draws)
        params = self.decoder.generate(u, noise, temperature, self.ops_for(u.device))
        return self.likelihood.sample(params, noise)

    def sample_pseudoinputs(self, n: int, temperature: float, noise: Noise) -> torch.Tensor:
        """n draws of u from the diffusion prior (normalised DCT space)."""
        return self.prior.sample(n, temperature, noise, self.ops_for(self.prior.coefficients.device))

    @torch.no_grad()
    def estimate_nll(self, x: torch.Tensor, k: int = 1000, chunk_size: int | None = None,
                     noise: Noise | dict | None = None) -> torch.Tensor:
        """Importance-sampled -log p(x) per example (nats) with k posterior samples.

        The k samples of each image run as one batch of up to ``chunk_size`` rows
        (default: 4096 image-samples per pass). For Bernoulli data one binarization per
        image is shared by all k samples. Noise names are those of ``forward`` with a
        leading batch of N*k rows per chunk, drawn chunk by chunk.
        """
        if k <= 0:
            raise ValueError(f"number of importance samples k must be positive, got {k}")
        if self.validate_inputs:
            check_images(x, self.config)
        noise = as_noise(noise)
        was_training = self.training
        self.eval()
        try:
            target = self.likelihood.target(x, noise)
            n = x.shape[0]
            per_pass = max(1, (chunk_size or 4096) // n)
            chunks = []
            for start in range(0, k, per_pass):
                kk = min(per_pass, k - start)
                draws = self.forward_draws(kk * n, x, noise, full_bound=True)
                draws.pop("binarize", None)  # one binarization per image, shared by all k
                chunks.append(self._log_weights(x, target, kk, draws).reshape(kk, n))
            log_w = torch.cat(chunks, 0)
            return -(torch.logsumexp(log_w, 0) - math.log(k))
        finally:
            self.train(was_training)

    def _log_weights(self, x: torch.Tensor, target: torch.Tensor, kk: int, draws: dict) -> torch.Tensor:
        """log p(x, z, u) - log q(z, u | x) for kk samples of each image (rows sample-major).

        The encoder is deterministic: one pass per image serves all kk samples."""
        def rep(t):
            return t.repeat(kk, 1, 1, 1)

        ops = self.ops_for(x.device)
        feats = [rep(f) for f in self.encoder(x, ops)]
        params, layers, _ = self.decoder(rep(x), feats, Noise(draws), True, ops)
        return self._log_weights_from(params, layers, rep(target))

    def _log_weights_from(self, params, layers, target) -> torch.Tensor:
        log_w = self.likelihood.log_prob(params, target) - layers[0].kl
        for lay in layers[1:]:
            log_w = log_w + gaussian_log_density(lay.z, lay.p_mu, lay.p_logvar) \
                - gaussian_log_density(lay.z, lay.q_mu, lay.q_logvar)
        return log_w

    def _posterior_mean_noise(self, x: torch.Tensor) -> Noise:
        dec = self.decoder
        c, k = self.config.image_channels, self.config.ctx_size
        zeros = {"u": x.new_zeros(x.shape[0], c, k, k)}
        for l, shape in enumerate(dec.latent_shapes):
            zeros[f"z{l}"] = x.new_zeros((x.shape[0],) + shape)
        return Noise(zeros)

    @torch.no_grad()
    def active_units(self, x: torch.Tensor, thresholds=(0.01, 0.001),
                     batch_size: int = 500) -> dict[float, float]:
        """Fraction of ladder-latent units with Var_x(E_q[z]) above each threshold.

        E_q[z_l] is taken along the posterior-mean path (u and every z above set to their
        means), so it is a deterministic function of x, as Burda et al. define it.
        """
        if self.validate_inputs:
            check_images(x, self.config)
        was_training = self.training
        self.eval()
        try:
            means = []
            for start in range(0, x.shape[0], batch_size):
                xb = x[start:start + batch_size]
                ops = self.ops_for(xb.device)
                _, layers, _ = self.decoder(xb, self.encoder(xb, ops), self._posterior_mean_noise(xb), False, ops)
                means.append(torch.cat([lay.q_mu.flatten(1) for lay in layers[1:]], dim=1))
            var = torch.cat(means, 0).var(0)
            return {thr: float((var > thr).float().mean()) for thr in thresholds}
        finally:
            self.train(was_training)


def set_dct_scale(model: DVPVAE, images, max_images: int | None = None) -> torch.Tensor:
    """Compute ``dct_scale`` from training images (tensor or iterable of batches) and store it."""
    from dvpvae.dct import compute_dct_scale

    cfg = model.config
    n = max_images if max_images is not None else cfg.dct_scale_images
    scale = compute_dct_scale(images, cfg.ctx_size, n)
    if scale.shape != model.dct_scale.shape:
        raise ValueError(f"images give a dct_scale of shape {tuple(scale.shape)}, the model "
                         f"expects {tuple(model.dct_scale.shape)}")
    model.dct_scale.copy_(scale.to(model.dct_scale))
    return model.dct_scale
