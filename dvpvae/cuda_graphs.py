"""CUDA-graph replay of the whole sampler (prior loop + decoder) for one batch size.

Sampling launches hundreds of small kernels (T UNet calls, then the ladder); on a GPU the
launch overhead dominates at small batch sizes. Capturing the sequence once and replaying
it removes that overhead. Only used on CUDA; nothing here runs on CPU.
"""
from __future__ import annotations

import torch

from dvpvae.model import DVPVAE
from dvpvae.noise import Noise
from dvpvae.sampling import sample_prior_ref


class GraphSampler:
    """Captures ``model.sample(n, ...)`` into a CUDA graph; ``run()`` replays it.

    The graph draws its noise from the CUDA default generator, which CUDA graphs support by
    advancing the generator's offset on every replay, so each replay gives fresh samples.
    Outputs are cloned so that later replays do not overwrite what a caller holds.
    """

    def __init__(self, model, n: int, temperature: float, prior_temperature: float, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphSampler needs a CUDA device")
        self.model, self.n = model, n
        self.temperature, self.prior_temperature = temperature, prior_temperature
        self.graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):  # lazy init (cuDNN plans, allocator pools) off the graph
                self._eager()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.static_out = self._eager()

    def _eager(self) -> torch.Tensor:
        # The eager reference path on purpose: the graph itself removes the launch overhead
        # that torch.compile would otherwise target, and compiled callables inside a capture
        # would need their own warm-up.
        m = self.model
        noise = Noise()
        u = sample_prior_ref(m.prior, self.n, self.prior_temperature, noise)
        draws = m.sample_draws(self.n, m.prior.coefficients, noise)
        return DVPVAE._decode_sample(m, u, draws, self.temperature)

    def run(self) -> torch.Tensor:
        self.graph.replay()
        return self.static_out.clone()
