"""Explicit noise for every random draw of the model.

Every stochastic step of DVP-VAE asks a ``Noise`` object for its draw by name, so two
models (the reference and the fast one, or ours and the research code) given the same
draws compute the same numbers. Missing draws are generated from ``generator`` (or the
global RNG) and can be recorded for replay.

Draw names (N = batch, C/H/W image, c = ctx_size, T = diffusion steps):

  forward
    ``u``                 (N,C,c,c)   standard normal, pseudoinput sample from q(u|x)
    ``diffusion_eps0``    (N,C,c,c)   standard normal, z_0 for the L_0 term
    ``diffusion_t``       (N,)        uniform [0,1), train-mode diffusion time
    ``diffusion_eps``     (N,C,c,c)   train mode; (T,N,C,c,c) eval mode, row k for t=(k+1)/T
    ``unet_dropout``      (B,N,W,c,c) uniform [0,1), train mode with UNet dropout > 0 only:
                                      unit kept when u >= p, one slice per UNet ResBlock
    ``z0`` ... ``z{L-1}`` latent shape, standard normal, ladder latents top -> bottom
    ``binarize``          (N,C,H,W)   uniform [0,1), Bernoulli target = (u < (x+1)/2)
  estimate_nll / importance_log_weights: ``binarize`` once per image, then for each of the
  k samples in turn (N rows each), in this order:
    ``u``                 as in forward
    ``trajectory_eps``    (T+1,N,C,c,c) standard normal, u's forward diffusion trajectory:
                                      row 0 for z_0 | u, row i for z_{i/T} | z_{(i-1)/T}
    ``z0`` ... ``z{L-1}`` as in forward
  sample
    ``prior_zT``          (n,C,c,c)   standard normal, z_1 of the diffusion sampler
    ``prior_eps``         (S,n,C,c,c) standard normal, row 0 used at the first step t=1;
                                      S = the sampler's steps (``prior_steps``, default T)
    ``z0`` ... ``z{L-1}`` as above, drawn from the priors
    ``mix_component``     (n,M,H,W)   uniform (1e-5, 1-1e-5), Gumbel component choice
    ``mix_logistic``      (n,C,H,W)   uniform (1e-5, 1-1e-5), logistic noise
  encode: those of forward. decode: those of sample after u, ``z{l}`` only for the layers
  drawn from their priors. reconstruct: encode's, then decode's (layer l takes ``z{l}``
  whether its sample comes from the posterior or the prior).
"""
from __future__ import annotations

from typing import Mapping

import torch


class Noise:
    """A source of named random draws: supplied tensors first, then fresh draws.

    Args:
        draws: name -> tensor; a supplied draw must have exactly the requested shape.
        generator: torch.Generator for the draws that are not supplied.
        record: keep every draw (supplied or fresh) in ``self.recorded`` for replay.
    """

    def __init__(self, draws: Mapping[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, record: bool = False):
        self.draws = dict(draws or {})
        self.generator = generator
        self.recorded: dict[str, torch.Tensor] | None = {} if record else None

    def _take(self, name: str, shape, like: torch.Tensor, fresh) -> torch.Tensor:
        shape = torch.Size(shape)
        if name in self.draws:
            t = self.draws[name]
            if t.shape != shape:
                raise ValueError(f"noise draw {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}")
            t = t.to(device=like.device, dtype=like.dtype)
        else:
            t = fresh(shape)
        if self.recorded is not None:
            self.recorded[name] = t.detach().clone()
        return t

    def _gen_device(self, like: torch.Tensor) -> torch.device:
        # A CPU generator draws on CPU; the result is moved afterwards so that the same
        # seed gives the same numbers on every device.
        return self.generator.device if self.generator is not None else like.device

    def normal(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """Standard normal draw ``name`` of ``shape`` with the dtype/device of ``like``."""
        def fresh(s):
            dev = self._gen_device(like)
            return torch.randn(s, generator=self.generator, device=dev, dtype=like.dtype).to(like.device)
        return self._take(name, shape, like, fresh)

    def uniform(self, name: str, shape, like: torch.Tensor, low: float = 0.0,
                high: float = 1.0) -> torch.Tensor:
        """Uniform draw in [low, high) ``name`` of ``shape``."""
        def fresh(s):
            dev = self._gen_device(like)
            u = torch.rand(s, generator=self.generator, device=dev, dtype=like.dtype)
            return (low + (high - low) * u).to(like.device)
        return self._take(name, shape, like, fresh)


def as_noise(noise: "Noise | Mapping[str, torch.Tensor] | None") -> Noise:
    """Accept a Noise, a plain dict of draws, or None (fresh draws from the global RNG)."""
    if isinstance(noise, Noise):
        return noise
    return Noise(noise)
