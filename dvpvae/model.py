"""The reference DVP-VAE: plain PyTorch, readable, the oracle for every fast path."""
from __future__ import annotations

import math
import numbers
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import nn

from dvpvae.checkpoint import CheckpointError, config_from_dict, load_weights, staged_dir, write_weights
from dvpvae.config import Config, get_config
from dvpvae.decoder import Q_LOGVAR_RANGE, Layer, TopDownDecoder, gaussian_log_density
from dvpvae.diffusion import PriorTerms, check_steps
from dvpvae.encoder import Encoder
from dvpvae.likelihoods import make_likelihood
from dvpvae.noise import Noise, as_noise
from dvpvae.ops import ReferenceOps, get_ops


# Importance-sampling estimators of -log p(x) (``DVPVAE.estimate_nll``), the valid one first.
IS_ESTIMATORS = ("trajectory", "bound_plugin")


def importance_nll(log_w: torch.Tensor) -> torch.Tensor:
    """-log of the mean importance weight per image, from log weights (k, N)."""
    return -(torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))


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


@dataclass
class Latents:
    """The posterior of every stochastic layer of a batch (``DVPVAE.encode``): the pseudoinput
    u, then the ladder latents top (coarsest) -> bottom, the order of ``DVPVAEOutput.kl``.

    Each ``Layer`` holds the sample ``z``, the posterior ``q_mu``/``q_logvar``, the prior
    ``p_mu``/``p_logvar`` (clamped as the model uses them) and its ``kl`` column. u's
    ``q_mu`` is the normalised DCT context of x; its prior is the diffusion model, so its
    ``p_mu``/``p_logvar`` are None.
    """

    u: Layer
    ladder: list[Layer]
    context: torch.Tensor  # (N, C, H, W) in [-1, 1]: u's posterior mean in image space

    @property
    def layers(self) -> list[Layer]:
        return [self.u, *self.ladder]

    def samples(self, keep: int | None = None) -> list[torch.Tensor]:
        """[u, z_top, ...]: the samples of u and of the top ``keep`` ladder latents (default all)."""
        return [lay.z for lay in self.layers[:None if keep is None else 1 + keep]]


@dataclass
class Decoded:
    """Result of ``DVPVAE.decode``."""

    params: torch.Tensor  # likelihood parameters (N, out_channels, H, W)
    images: torch.Tensor  # (N, C, H, W) in [-1, 1], as ``sample`` returns them (Bernoulli: the mean)
    latents: list[torch.Tensor]  # [u, z_top, ..., z_bottom]: the given ones, then the drawn ones



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


MODEL_CARD = """---
{{ card_data }}
---

A DVP-VAE (hierarchical VAE with a diffusion-based VampPrior; A. Kuzina and J. M. Tomczak,
TMLR 2024) saved by the `dvpvae` package: `config.json` holds its `dvpvae.Config`,
`model.safetensors` its weights. Load it with `dvpvae.DVPVAE.from_pretrained(repo_id_or_folder)`
(or `dvpvae.FastDVPVAE.from_pretrained`).
"""
SAVED_FILES = ("config.json", "model.safetensors", "README.md")  # what save_pretrained writes


class DVPVAE(nn.Module, PyTorchModelHubMixin, library_name="dvpvae", tags=["dvp-vae", "vae"],
             model_card_template=MODEL_CARD):
    """Hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024).

    ``model(x, noise)`` returns a ``DVPVAEOutput``; train mode uses the single-t diffusion
    estimate of -log p(u), eval mode the T-point bound. See ``dvpvae.noise`` for the
    names of the random draws.

    ``ops`` names the op provider every block computes with (``dvpvae.ops``): "reference"
    (plain PyTorch, the default), "cpu" or "triton", or a provider instance.

    ``save_pretrained(folder)`` / ``from_pretrained(folder_or_repo_id)`` (huggingface_hub's
    ``PyTorchModelHubMixin``) write and read config.json + model.safetensors; ``push_to_hub``
    uploads them.
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

    # ------------------------------------------------------------------ hub-style folders
    def save_pretrained(self, save_directory, *, config=None, repo_id: str | None = None,
                        push_to_hub: bool = False, model_card_kwargs: dict | None = None, **push_to_hub_kwargs):
        """Write ``save_directory``: config.json (``self.config``), model.safetensors (the
        state_dict, ``dct_scale`` included) and a model card README.md (an existing one is kept).

        The folder is assembled under a temporary name and renamed into place, so it is
        never seen half-written; an existing folder is replaced only if it holds nothing but
        these files. ``push_to_hub=True`` then uploads it to ``repo_id`` (default: the
        folder's name) as ``push_to_hub`` does.
        """
        if config is not None:
            raise ValueError("the config.json of a DVPVAE is its Config (model.config); pass no config")
        readme = os.path.join(save_directory, "README.md")
        with staged_dir(save_directory, SAVED_FILES) as tmp:
            if os.path.isfile(readme):
                shutil.copy2(readme, tmp)
            super().save_pretrained(tmp, model_card_kwargs=model_card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or os.path.basename(os.path.abspath(save_directory)),
                                    model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(self, save_directory) -> None:
        write_weights(str(save_directory), self)  # the mixin leaves an existing config.json alone

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only,
                         token, config: dict | None = None, map_location: str | torch.device = "cpu",
                         **kwargs):
        """Build ``cls`` from the folder or hub repository ``model_id``; the rest of ``kwargs``
        are constructor options (``ops=``, FastDVPVAE's flags) or Config overrides."""
        if config is None:
            raise CheckpointError(f"{model_id} has no config.json (or it could not be downloaded)")
        cfg = config_from_dict(config, os.path.join(model_id, "config.json"))
        # The mixin also passes every entry of config.json as a keyword argument.
        options = {k: v for k, v in kwargs.items() if k not in config or v != config[k]}
        model = cls(cfg, **options)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, "model.safetensors")
        else:
            weights = hf_hub_download(model_id, "model.safetensors", revision=revision, cache_dir=cache_dir,
                                      force_download=force_download, token=token,
                                      local_files_only=local_files_only)
        load_weights(model, weights)
        return model.to(map_location).eval()

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
    def sample(self, n: int, temperature: float | Sequence[float] = 1.0, noise: Noise | dict | None = None,
               prior_temperature: float = 1.0, prior_steps: int | None = None) -> torch.Tensor:
        """Draw n images in [-1, 1].

        ``temperature`` scales the variance of the ladder latents' priors (as the research
        code's ``generate_x(t)``): one value, or one per ladder layer top -> bottom.
        ``prior_temperature`` scales the diffusion sampler noise; ``prior_steps`` is the
        number of its ancestral steps on the grid t_i = i/S (default T: the grid it was
        trained on; the noise "prior_eps" then has S rows).
        """
        if n <= 0:
            raise ValueError(f"number of samples must be positive, got {n}")
        temperatures = self.layer_temperatures(temperature)
        if prior_steps is not None:
            check_steps(prior_steps)
        noise = as_noise(noise)
        u = self.sample_pseudoinputs(n, prior_temperature, noise, prior_steps)
        return self._decode_sample(u, self.sample_draws(n, u, noise), temperatures)

    def layer_temperatures(self, temperature: float | Sequence[float]) -> tuple[float, ...]:
        """One temperature per ladder layer (top -> bottom) from one value or a sequence."""
        L = len(self.decoder.blocks)
        values = [temperature] * L if isinstance(temperature, numbers.Real) else list(temperature)
        if len(values) != L:
            raise ValueError(f"temperature has {len(values)} values; the model has {L} ladder layers "
                             "(give one value, or one per layer top -> bottom)")
        for t in values:
            if not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
                raise ValueError(f"temperatures must be finite non-negative numbers, got {temperature!r}")
        return tuple(float(t) for t in values)

    def sample_draws(self, n: int, like: torch.Tensor, noise: Noise, given: int = 0) -> dict:
        """The draws of the decoding half of ``sample`` (after u), in the reference order;
        ladder latents from z{given} on (the top ``given`` ones are supplied)."""
        cfg = self.config
        d = {f"z{l}": noise.normal(f"z{l}", (n,) + shape, like)
             for l, shape in enumerate(self.decoder.latent_shapes) if l >= given}
        if cfg.likelihood == "logistic_mixture":
            h = w = cfg.image_size
            d["mix_component"] = noise.uniform("mix_component", (n, cfg.num_mix, h, w), like, 1e-5, 1 - 1e-5)
            d["mix_logistic"] = noise.uniform("mix_logistic", (n, cfg.image_channels, h, w), like, 1e-5, 1 - 1e-5)
        return d

    def _decode_sample(self, u: torch.Tensor, draws: dict, temperatures: tuple[float, ...]) -> torch.Tensor:
        """The images of ``sample``'s prior pass from u."""
        return self._decode(u, draws, temperatures)[2]

    def _decode(self, u: torch.Tensor, draws: dict, temperatures: tuple[float, ...],
                given: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(likelihood parameters, ladder latents, images) of the prior pass from u with the
        top ``len(given)`` ladder latents given."""
        noise = Noise(draws)
        params, zs = self.decoder.generate(u, noise, temperatures, self.ops_for(u.device), given)
        return params, zs, self.likelihood.sample(params, noise)

    def sample_pseudoinputs(self, n: int, temperature: float, noise: Noise, steps: int | None = None) -> torch.Tensor:
        """n draws of u from the diffusion prior (normalised DCT space) through ``steps``
        ancestral steps (default T)."""
        return self.prior.sample(n, temperature, noise, self.ops_for(self.prior.coefficients.device), steps)

    # ------------------------------------------------------------------ latents
    def encode(self, x: torch.Tensor, noise: Noise | dict | None = None) -> Latents:
        """The posterior of every stochastic layer for images x, as ``forward`` computes it
        with the same noise (its draws and names; in eval mode u's ``kl`` uses the T-point
        bound, in train mode one random t)."""
        if self.validate_inputs:
            check_images(x, self.config)
        draws = self.forward_draws(x.shape[0], x, as_noise(noise), full_bound=not self.training)
        ops = self.ops_for(x.device)
        _, layers, _ = self.decoder(x, self.encoder(x, ops), Noise(draws), not self.training, ops)
        context = self.decoder.pseudoinput.to_image(layers[0].q_mu, ops)
        return Latents(layers[0], layers[1:], context)

    def decode(self, latents: Latents | torch.Tensor | Sequence[torch.Tensor],
               temperature: float | Sequence[float] = 1.0, noise: Noise | dict | None = None) -> Decoded:
        """Likelihood parameters and images from latents: a ``Latents``, a pseudoinput u
        alone, or a list [u, z_top, ...] of u and the top k ladder latents (k = 0 ... L).
        The missing ladder latents are drawn from their priors (draws "z{l}") with the
        variance scaled by ``temperature`` (one value or one per ladder layer). Gradients
        flow to the given latents when enabled."""
        given = self._check_latents(latents)
        temperatures = self.layer_temperatures(temperature)
        u, n = given[0], given[0].shape[0]
        draws = self.sample_draws(n, u, as_noise(noise), given=len(given) - 1)
        params, zs, images = self._decode(u, draws, temperatures, given[1:])
        return Decoded(params, images, [u, *zs])

    def _check_latents(self, latents) -> list[torch.Tensor]:
        """[u, z_top, ...] from ``decode``'s argument, or ValueError naming the wrong entry."""
        if isinstance(latents, Latents):
            return latents.samples()
        given = [latents] if isinstance(latents, torch.Tensor) else list(latents)
        shapes = self.latent_shapes
        if not 1 <= len(given) <= len(shapes):
            raise ValueError(f"latents must be u and at most {len(shapes) - 1} ladder latents, got "
                             f"{len(given)} tensors")
        names = ["u"] + [f"z{l}" for l in range(len(shapes) - 1)]
        for name, z in zip(names, given):
            if not isinstance(z, torch.Tensor) or not z.is_floating_point():
                raise ValueError(f"latent {name} must be a floating-point tensor, got {z!r:.80}")
        batch = tuple(given[0].shape[:1])
        for name, z, shape in zip(names, given, shapes):
            if tuple(z.shape) != batch + shape:
                raise ValueError(f"latent {name} has shape {tuple(z.shape)}, expected {batch + shape}")
        return given

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """Per-example shapes of u, then the ladder latents top -> bottom."""
        cfg = self.config
        return [(cfg.image_channels, cfg.ctx_size, cfg.ctx_size), *self.decoder.latent_shapes]

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, keep: int, temperature: float | Sequence[float] = 1.0,
                    noise: Noise | dict | None = None) -> torch.Tensor:
        """Images from u and the top ``keep`` ladder latents of the posterior of x, the
        other ladder latents drawn from their priors (keep = 0 ... L). Layer l uses the
        draw "z{l}" for its posterior or prior sample alike."""
        L = len(self.decoder.blocks)
        if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or not 0 <= keep <= L:
            raise ValueError(f"keep must be an integer in 0 ... {L} (the number of ladder layers), got {keep!r}")
        noise = as_noise(noise)
        return self.decode(self.encode(x, noise).samples(keep), temperature, noise).images

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Images along the straight line between the posterior-mean latents (u and every
        ladder latent, each z above at its mean) of x1 and x2: (N, steps, C, H, W), the
        first column decoded from x1's latents, the last from x2's."""
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 2:
            raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        a = self.encode(x1, self._posterior_mean_noise(x1)).samples()
        b = self.encode(x2, self._posterior_mean_noise(x2)).samples()
        w = torch.linspace(0, 1, steps, dtype=x1.dtype, device=x1.device)
        mixed = [torch.lerp(za.unsqueeze(0), zb.unsqueeze(0), w.view(-1, *[1] * za.dim())).flatten(0, 1)
                 for za, zb in zip(a, b)]
        images = self.decode(mixed).images
        return images.reshape(steps, *x1.shape).transpose(0, 1)

    def importance_draws(self, n: int, like: torch.Tensor, noise: Noise) -> dict:
        """The draws of one importance sample of n images, in the reference order: u ~ q(u|x),
        u's forward trajectory and the ladder latents (the binarization is per image)."""
        cfg = self.config
        u_shape = (n, cfg.image_channels, cfg.ctx_size, cfg.ctx_size)
        d = {"u": noise.normal("u", u_shape, like),
             "trajectory_eps": noise.normal("trajectory_eps", (cfg.diffusion_steps + 1,) + u_shape, like)}
        for l, shape in enumerate(self.decoder.latent_shapes):
            d[f"z{l}"] = noise.normal(f"z{l}", (n,) + shape, like)
        return d

    @torch.no_grad()
    def importance_log_weights(self, x: torch.Tensor, k: int = 1000, chunk_size: int | None = None,
                               noise: Noise | dict | None = None, progress=None) -> dict[str, torch.Tensor]:
        """Log importance weights (k, N) of every estimator in ``IS_ESTIMATORS``, from one pass.

        The k samples of each image run as batches of up to ``chunk_size`` image-samples
        (default 4096; at least one sample of every image per batch); ``progress`` is called
        with the number of image-samples after each batch. The estimators share every draw:
        a sample asks ``noise`` for ``importance_draws`` (N rows), one sample after the other,
        so the weights do not depend on ``chunk_size``. For Bernoulli data one binarization
        per image is drawn first and shared by all k samples.
        """
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
            raise ValueError(f"number of importance samples k must be a positive int, got {k!r}")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if self.validate_inputs:
            check_images(x, self.config)
        noise = as_noise(noise)
        was_training = self.training
        self.eval()
        try:
            target = self.likelihood.target(x, noise)
            n = x.shape[0]
            per_pass = max(1, (chunk_size or 4096) // n)
            chunks = {name: [] for name in IS_ESTIMATORS}
            for start in range(0, k, per_pass):
                kk = min(per_pass, k - start)
                samples = [self.importance_draws(n, x, noise) for _ in range(kk)]
                # rows sample-major; the trajectory's leading axis is its time step
                draws = {name: torch.cat([d[name] for d in samples], 1 if name == "trajectory_eps" else 0)
                         for name in samples[0]}
                for name, log_w in self._log_weights(x, target, kk, draws).items():
                    chunks[name].append(log_w.reshape(kk, n))
                if progress is not None:
                    progress(kk * n)
            return {name: torch.cat(c, 0) for name, c in chunks.items()}
        finally:
            self.train(was_training)

    @torch.no_grad()
    def estimate_nll(self, x: torch.Tensor, k: int = 1000, chunk_size: int | None = None,
                     noise: Noise | dict | None = None, estimator: str = "trajectory",
                     return_log_weights: bool = False):
        """Importance-sampled -log p(x) per example (nats) with k posterior samples.

        ``estimator``: "trajectory" (default), the valid importance-sampling estimate of
        MODEL.md section 7 (u's forward diffusion trajectory is a latent too; exp(-nll) is
        unbiased for p(x) of the T-step model ``sample`` draws from with its default
        ``prior_steps``, and k = 1 is a one-sample ELBO); "bound_plugin", the same samples
        with one random draw of the T-point bound in place of log p(u) (the research code's
        shortcut: neither unbiased nor a bound).
        With ``return_log_weights`` returns (nll, log weights (k, N)). Batching and noise:
        ``importance_log_weights``.
        """
        if estimator not in IS_ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {IS_ESTIMATORS}")
        log_w = self.importance_log_weights(x, k, chunk_size, noise)[estimator]
        nll = importance_nll(log_w)
        return (nll, log_w) if return_log_weights else nll

    def _log_weights(self, x: torch.Tensor, target: torch.Tensor, kk: int, draws: dict) -> dict[str, torch.Tensor]:
        """log w of each estimator for kk samples of each image (rows sample-major).

        The encoder is deterministic: one pass per image serves all kk samples."""
        def rep(t):
            return t.repeat(kk, 1, 1, 1)

        ops = self.ops_for(x.device)
        feats = [rep(f) for f in self.encoder(x, ops)]
        params, layers, _ = self.decoder(rep(x), feats, Noise(draws), None, ops)
        return self._log_weights_from(params, layers, rep(target), draws["trajectory_eps"], ops)

    def _log_weights_from(self, params, layers, target, trajectory_eps, ops) -> dict[str, torch.Tensor]:
        """Both estimators' log w from one decoder pass: they differ only in the prior term of u."""
        u = layers[0]
        log_w = self.likelihood.log_prob(params, target) - gaussian_log_density(u.z, u.q_mu, u.q_logvar)
        for lay in layers[1:]:
            log_w = log_w + gaussian_log_density(lay.z, lay.p_mu, lay.p_logvar) \
                - gaussian_log_density(lay.z, lay.q_mu, lay.q_logvar)
        log_ratio, bound = self.prior.trajectory_terms(u.z, trajectory_eps, ops)
        return {"trajectory": log_w + log_ratio, "bound_plugin": log_w - bound.neg_log_p}

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
