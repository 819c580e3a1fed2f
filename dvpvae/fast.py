"""FastDVPVAE: DVPVAE with the fastest op provider for its device, compiled.

The modules, parameters, state_dict and noise interface are DVPVAE's. What differs:

* the op provider (``dvpvae.ops``) is the best one for the device the inputs are on:
  ``triton`` on CUDA, ``cpu`` on the CPU (``fused_kernels=False``: ``reference``), unless
  ``ops=`` names one;
* torch.compile of the training / evaluation forward, the importance-sampling pass and
  the sample decoder. All noise is drawn eagerly in the reference order and passed in, so
  the compiled graphs hold no RNG;
* on CUDA, the no-grad compiled passes run as CUDA graphs and ``sample`` replays one
  captured graph per (n, temperatures);
* ``precision="bf16"``: the passes run under bfloat16 autocast (convolutions and matmuls
  from float32 master weights) with the provider wrapped in ``dvpvae.ops.Bf16Ops``, which
  keeps the KL, log-densities, likelihood and diffusion bound in float32.

``FastDVPVAE(..., compile=False, fused_kernels=False, extension=False, cuda_graphs=False)``
computes exactly what DVPVAE computes, bit for bit.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from dvpvae.compiling import compile_pass
from dvpvae.config import PRECISIONS, Config
from dvpvae.cuda_graphs import GraphSampler, prior_graphs
from dvpvae.diffusion import check_steps
from dvpvae.model import DVPVAE, DVPVAEOutput
from dvpvae.noise import Noise
from dvpvae.ops import REFERENCE, Bf16Ops, ReferenceOps, TritonOps, best_ops, get_ops

# Dynamo traces through the lru_cache of the DCT basis builder; the basis is a pure
# function of (size, rows, dtype, device), so tracing the builder gives the same constant.
warnings.filterwarnings("ignore", message=r".*functools.lru_cache.*", module=r"torch\._dynamo.*")

# One compiled function per (pass, mode), shared by every FastDVPVAE and called with the model
# as its first argument. Dynamo guards on the model's structure, not its identity, so another
# model of the same shapes reuses the traced graph; a torch.compile per model would be a new
# backend each time, retraced, and the ninth model would exceed Dynamo's recompile limit and
# run uncompiled.
_COMPILED_PASSES: dict[tuple[str, str | None], object] = {}
# Graphs a pass may keep, one per (batch size, structure, grad mode, precision): compiled with
# dynamic=False, a pass past Dynamo's default of 8 would run uncompiled from then on.
RECOMPILE_LIMIT = 64


def native_bf16_reason(device: torch.device) -> str | None:
    """Why ``device`` computes bfloat16 without hardware support (None when it has it)."""
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        if not (caps.get("avx512_bf16") or caps.get("amx_bf16")):
            return "this CPU has neither AVX512-BF16 nor AMX-BF16, so oneDNN emulates bfloat16"
    elif device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16"
    return None


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


def _autocast_bf16(fn, device: torch.device):
    """``fn`` called under bfloat16 autocast on ``device``'s type (compiled graphs guard on
    the autocast state, so entering it outside them compiles the bfloat16 graph)."""
    @functools.wraps(fn)
    def run(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args)
    return run


class FastDVPVAE(DVPVAE):
    """Drop-in ``DVPVAE`` computing with the best op provider for its device, compiled."""

    def __init__(self, config: Config | str = "mnist", *, compile: bool = True, fused_kernels: bool = True,
                 extension: bool = True, cuda_graphs: bool = True, ops: str | ReferenceOps | None = None,
                 precision: str = "float32", **overrides):
        super().__init__(config, **overrides)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose from {PRECISIONS}")
        self.use_compile, self.use_fused = compile, fused_kernels
        self.use_extension, self.use_cuda_graphs = extension, cuda_graphs
        self.precision = precision
        self.ops = None if ops is None else self._with_precision(get_ops(ops, extension))  # None: per device
        self._ops_by_device: dict[torch.device, ReferenceOps] = {}
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
        """The provider named at construction, else the best for ``device`` (``best_ops``);
        with ``precision="bf16"`` wrapped in ``Bf16Ops``, warning once where ``device`` has no
        native bfloat16."""
        if device not in self._ops_by_device:
            ops = self.ops
            if ops is None:
                ops = best_ops(device, self.use_fused, self.use_extension)
                # The fused Triton kernels are float32; inductor writes bfloat16 ones from the reference.
                ops = self._with_precision(REFERENCE if self.precision == "bf16" and isinstance(ops, TritonOps)
                                           else ops)
            reason = native_bf16_reason(device) if self.precision == "bf16" else None
            if reason is not None:
                warnings.warn(f"precision='bf16' on {device}: {reason}; expect it to be slower than float32 "
                              "(the default)", RuntimeWarning, stacklevel=2)
            self._ops_by_device[device] = ops
        return self._ops_by_device[device]

    def _with_precision(self, ops: ReferenceOps) -> ReferenceOps:
        return Bf16Ops(ops) if self.precision == "bf16" else ops

    def _run_pass(self, fn, device: torch.device, *args):
        """``fn(self, *args)``: compiled (``_COMPILED_PASSES``) unless ``compile=False``, under
        bfloat16 autocast with ``precision="bf16"``."""
        self.ops_for(device)  # chosen (and any warning given) outside the traced code
        limit = contextlib.nullcontext()
        if self.use_compile:
            mode = compile_mode(device, self.use_cuda_graphs, torch.is_grad_enabled())
            key = (fn.__qualname__, mode)
            if key not in _COMPILED_PASSES:
                compiled = compile_pass(fn, mode)
                _COMPILED_PASSES[key] = compiled if mode is None else _graph_replay(compiled)
            fn = _COMPILED_PASSES[key]
            limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
        if self.precision != "float32":
            fn = _autocast_bf16(fn, device)
        with limit:
            return fn(self, *args)

    # ------------------------------------------------------------------ compiled passes
    def _loss_terms(self, x: torch.Tensor, draws: dict):
        out = super()._forward_given_draws(x, draws)
        return out.loss, out.rec, out.kl

    def _forward_given_draws(self, x: torch.Tensor, draws: dict) -> DVPVAEOutput:
        loss, rec, kl = self._run_pass(FastDVPVAE._loss_terms, x.device, x, draws)
        return DVPVAEOutput(loss, rec, kl, -(rec + kl.sum(-1)))

    def _log_weights(self, x: torch.Tensor, target: torch.Tensor, kk: int, draws: dict) -> dict[str, torch.Tensor]:
        return self._run_pass(DVPVAE._log_weights, x.device, x, target, kk, draws)

    def _decode_sample(self, u: torch.Tensor, draws: dict, temperatures: tuple[float, ...]) -> torch.Tensor:
        return self._run_pass(DVPVAE._decode_sample, u.device, u, draws, temperatures)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, temperature=1.0, noise=None, prior_temperature: float = 1.0,
               prior_steps: int | None = None):
        """``DVPVAE.sample``. On CUDA with ``cuda_graphs``: without ``noise`` one captured
        graph per (n, temperatures, prior steps, mode) replays the whole call, drawing its
        noise on the device; with ``noise`` the prior's loop replays its own graph
        (``dvpvae.cuda_graphs.PriorLoop``) and the compiled decoder follows, so the result
        is the reference's for those draws."""
        device = self.prior.coefficients.device
        graphs = self.use_cuda_graphs and device.type == "cuda"
        if graphs and noise is None and n > 0:
            temperatures = self.layer_temperatures(temperature)
            steps = self.prior.T if prior_steps is None else check_steps(prior_steps)
            key = (n, temperatures, float(prior_temperature), steps, device, self.training, self.prior.training)
            sampler = self._graph_samplers.get(key)
            if sampler is None or sampler.stale():
                decode = super()._decode_sample  # uncompiled: the graph removes the launches

                def eager():
                    draws = Noise()
                    u = self.sample_pseudoinputs(n, prior_temperature, draws, steps)
                    return decode(u, self.sample_draws(n, u, draws), temperatures)
                sampler = self._graph_samplers[key] = GraphSampler(eager, watch=self)
            return sampler.run()
        with prior_graphs(graphs):
            return super().sample(n, temperature, noise, prior_temperature, prior_steps)
