"""FastDVPVAE: DVPVAE with the fastest op provider for its device, compiled.

The modules, parameters, state_dict and noise interface are DVPVAE's. What differs:

* the op provider (``dvpvae.ops``) is the best one for the device the inputs are on:
  ``triton`` on CUDA, ``cpu`` on the CPU (``fused_kernels=False``: ``reference``), unless
  ``ops=`` names one;
* torch.compile of the training / evaluation forward, the importance-sampling pass and
  the sample decoder. All noise is drawn eagerly in the reference order and passed in, so
  the compiled graphs hold no RNG;
* on CUDA, the no-grad compiled passes run as CUDA graphs and ``sample`` replays one
  captured graph per (n, temperatures).

``FastDVPVAE(..., compile=False, fused_kernels=False, extension=False, cuda_graphs=False)``
computes exactly what DVPVAE computes, bit for bit.
"""
from __future__ import annotations

import functools
import warnings

import torch

from dvpvae.config import Config
from dvpvae.cuda_graphs import GraphSampler, prior_graphs
from dvpvae.model import DVPVAE, DVPVAEOutput
from dvpvae.noise import Noise
from dvpvae.ops import ReferenceOps, best_ops, get_ops

# Dynamo traces through the lru_cache of the DCT basis builder; the basis is a pure
# function of (size, rows, dtype, device), so tracing the builder gives the same constant.
warnings.filterwarnings("ignore", message=r".*functools.lru_cache.*", module=r"torch\._dynamo.*")


def compile_mode(device: torch.device, cuda_graphs: bool, grad_enabled: bool) -> str | None:
    """torch.compile mode of a pass: CUDA graphs ("reduce-overhead") for the no-grad passes
    on CUDA, the default elsewhere. Training stays on plain compiled kernels: its graphs
    would pin every saved activation in the CUDA-graph memory pool."""
    return "reduce-overhead" if cuda_graphs and device.type == "cuda" and not grad_enabled else None


def _graph_replay(compiled):
    """Call a CUDA-graph-compiled function as a new step each time and return copies:
    a later replay overwrites the graph's output buffers, which callers may still hold."""
    @functools.wraps(compiled)
    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, compiled(*args))
    return run


class FastDVPVAE(DVPVAE):
    """Drop-in ``DVPVAE`` computing with the best op provider for its device, compiled."""

    def __init__(self, config: Config | str = "mnist", *, compile: bool = True, fused_kernels: bool = True,
                 extension: bool = True, cuda_graphs: bool = True, ops: str | ReferenceOps | None = None,
                 **overrides):
        super().__init__(config, **overrides)
        self.use_compile, self.use_fused = compile, fused_kernels
        self.use_extension, self.use_cuda_graphs = extension, cuda_graphs
        self.ops = None if ops is None else get_ops(ops, extension)  # None: the best per device
        self._ops_by_device: dict[torch.device, ReferenceOps] = {}
        self._compiled: dict[tuple[str, str | None], object] = {}
        self._graph_samplers: dict = {}

    @classmethod
    def from_reference(cls, model: DVPVAE, share: bool = True, **flags) -> "FastDVPVAE":
        """A FastDVPVAE on ``model``'s weights: the same modules (parameters, buffers and
        train/eval mode) with ``share``, else a copy."""
        fast = cls(model.config, **flags)
        if share:
            fast.likelihood, fast.encoder, fast.decoder = model.likelihood, model.encoder, model.decoder
            fast.validate_inputs = model.validate_inputs
            fast.train(model.training)
        else:
            fast.to(next(model.parameters()).device)
            fast.load_state_dict(model.state_dict())
            fast.train(model.training)
        return fast

    def ops_for(self, device: torch.device) -> ReferenceOps:
        """The provider named at construction, else the best for ``device`` (``best_ops``)."""
        if self.ops is not None:
            return self.ops
        if device not in self._ops_by_device:
            self._ops_by_device[device] = best_ops(device, self.use_fused, self.use_extension)
        return self._ops_by_device[device]

    def _maybe_compiled(self, name: str, fn, device: torch.device):
        if not self.use_compile:
            return fn
        mode = compile_mode(device, self.use_cuda_graphs, torch.is_grad_enabled())
        if (name, mode) not in self._compiled:
            # dynamic=False: a new batch size recompiles once instead of generating slower
            # shape-generic code for every size.
            compiled = torch.compile(fn, dynamic=False, mode=mode)
            self._compiled[name, mode] = compiled if mode is None else _graph_replay(compiled)
        return self._compiled[name, mode]

    # ------------------------------------------------------------------ compiled passes
    def _loss_terms(self, x: torch.Tensor, draws: dict):
        out = super()._forward_given_draws(x, draws)
        return out.loss, out.rec, out.kl

    def _forward_given_draws(self, x: torch.Tensor, draws: dict) -> DVPVAEOutput:
        loss, rec, kl = self._maybe_compiled("loss", self._loss_terms, x.device)(x, draws)
        return DVPVAEOutput(loss, rec, kl, -(rec + kl.sum(-1)))

    def _log_weights(self, x: torch.Tensor, target: torch.Tensor, kk: int, draws: dict) -> torch.Tensor:
        return self._maybe_compiled("log_weights", super()._log_weights, x.device)(x, target, kk, draws)

    def _decode_sample(self, u: torch.Tensor, draws: dict, temperature: float) -> torch.Tensor:
        return self._maybe_compiled("decode", super()._decode_sample, u.device)(u, draws, temperature)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, noise=None, prior_temperature: float = 1.0):
        """``DVPVAE.sample``. On CUDA with ``cuda_graphs``: without ``noise`` one captured
        graph per (n, temperatures, mode) replays the whole call, drawing its noise on the
        device; with ``noise`` the prior's loop replays its own graph
        (``dvpvae.cuda_graphs.PriorLoop``) and the compiled decoder follows, so the result
        is the reference's for those draws."""
        device = self.prior.coefficients.device
        graphs = self.use_cuda_graphs and device.type == "cuda"
        if graphs and noise is None and n > 0:
            key = (n, float(temperature), float(prior_temperature), device, self.training, self.prior.training)
            sampler = self._graph_samplers.get(key)
            if sampler is None or sampler.stale():
                decode = super()._decode_sample  # uncompiled: the graph removes the launches

                def eager():
                    draws = Noise()
                    u = self.sample_pseudoinputs(n, prior_temperature, draws)
                    return decode(u, self.sample_draws(n, u, draws), temperature)
                sampler = self._graph_samplers[key] = GraphSampler(eager, watch=self)
            return sampler.run()
        with prior_graphs(graphs):
            return super().sample(n, temperature, noise, prior_temperature)
