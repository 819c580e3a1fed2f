"""CUDA execution of the fast path: whether the Triton kernels run on a GPU, and CUDA-graph
replay of the sampler.

* ``triton_unsupported_reason(device)``: why the fused kernels cannot run on a CUDA device
  (no triton, a GPU older than Triton supports, a failing probe launch), or None.
* ``PriorLoop``: the prior's whole ancestral loop (UNet, then the fused ``ddpm_step``) for
  one batch size and number of steps. ``run`` computes it eagerly on any device; after
  ``capture`` (CUDA only) it copies its inputs into static buffers and replays one graph.
  ``sample_prior_loop`` is the cached entry point of ``TritonOps.sample_prior``.
* ``GraphSampler``: one graph for a whole ``sample()`` call (prior loop and decoder).

Sampling launches hundreds of small kernels (T UNet calls, then the ladder); capturing the
sequence once and replaying it removes the launch overhead.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import itertools
import weakref

import torch
from torch import nn


# ----------------------------------------------------------------------------- Triton on a GPU
def min_compute_capability() -> tuple[int, int]:
    """The oldest NVIDIA architecture the installed Triton compiles for: 8.0 from Triton 3.3
    (its pre-Ampere matmul path was removed), 7.0 before."""
    from dvpvae.kernels._triton import triton

    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return (8, 0)
    return (8, 0) if (major, minor) >= (3, 3) else (7, 0)


def _probe(device: torch.device) -> None:
    """Launch an elementwise and a tl.dot kernel on ``device`` and compare them with their
    references; raises whatever a broken toolchain or driver raises."""
    from dvpvae.kernels.conv1x1_act import conv1x1_act, conv1x1_act_ref
    from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step, ddpm_step_ref

    gen = torch.Generator().manual_seed(0)
    z, e, n = (torch.randn(2, 1, 3, 3, generator=gen).to(device) for _ in range(3))
    coef = ddpm_coefficients(4, -6.0, 7.0, device=device)
    step = torch.tensor(2, device=device)
    x = torch.randn(2, 8, 3, 3, generator=gen).to(device)
    w = (torch.randn(4, 8, 1, 1, generator=gen) / 8 ** 0.5).to(device)
    b = torch.randn(4, generator=gen).to(device)
    with torch.no_grad():
        pairs = [(ddpm_step(z, e, n, coef, step, 0.5), ddpm_step_ref(z, e, n, coef, step, 0.5)),
                 (conv1x1_act(x, w, b, "silu"), conv1x1_act_ref(x, w, b, "silu"))]
    for got, want in pairs:
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"a probe kernel differs from its reference by "
                               f"{float((got - want).abs().max()):.3g}")


def triton_unsupported_reason(device: torch.device) -> str | None:
    """Why the fused Triton kernels cannot run on CUDA ``device``, or None when they can.

    Checked in order: the triton package, the GPU's compute capability (NVIDIA only; ROCm
    devices go straight to the probe), then a probe launch of two kernels.
    """
    from dvpvae.kernels import triton_runs_on

    device = torch.device(device)
    if not triton_runs_on(device):
        return "the triton package is not importable"
    if torch.version.hip is None:
        cap = tuple(torch.cuda.get_device_capability(device))
        need = min_compute_capability()
        if cap < need:
            return (f"the GPU has compute capability {cap[0]}.{cap[1]} and this Triton compiles "
                    f"for {need[0]}.{need[1]} and newer")
    try:
        _probe(device)
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use the kernels
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"a probe launch of the Triton kernels failed ({type(exc).__name__}: {first})"
    return None


# ----------------------------------------------------------------------------- graph policy
_PRIOR_GRAPHS = contextvars.ContextVar("dvpvae_prior_graphs", default=True)


@contextlib.contextmanager
def prior_graphs(enabled: bool):
    """Within the block, ``sample_prior_loop`` captures and replays graphs only if
    ``enabled`` (it always computes eagerly off CUDA)."""
    token = _PRIOR_GRAPHS.set(bool(enabled))
    try:
        yield
    finally:
        _PRIOR_GRAPHS.reset(token)


def capturing(device: torch.device) -> bool:
    """True while a CUDA graph capture is under way on the current stream of ``device``."""
    return torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()


def _signature(module: nn.Module, *extra: torch.Tensor) -> tuple:
    """Addresses of ``module``'s parameters and buffers (and ``extra``): a graph reads them
    by address, so a change (``.to()``, ``.double()``) makes it stale. In-place updates
    (optimizer steps, load_state_dict) keep the addresses, and replays see the new values."""
    return tuple(t.data_ptr() for t in itertools.chain(module.parameters(), module.buffers(), extra))


def _warm_up_and_capture(fn, warmup: int):
    """Run ``fn`` ``warmup`` times on a side stream (lazy initialisation: library handles,
    kernel compilation, allocator pools stay off the graph), then capture it; returns
    (graph, fn's output inside the graph's memory)."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), prior_graphs(False):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph), torch.no_grad(), prior_graphs(False):
        out = fn()
    return graph, out


# ----------------------------------------------------------------------------- prior loop
class PriorLoop:
    """The S ancestral steps of ``prior`` (``steps``, default its T) for batches of ``n``,
    computed with ``ops.ddpm_step``.

    Step k (row i = S-1-k of the coefficient table ``prior.step_table(S)``) is
    ``z = ops.ddpm_step(z, unet(z, t_k), eps[k], coef, rows[k], 1.0)`` where ``rows[k]`` is
    a 0-dim int64 tensor on the device and ``coef`` is the table with its noise column
    scaled by the temperature: nothing in the loop reads a host value, so it can be
    captured, and one graph serves every temperature. The result equals
    ``prior.sample_loop(z_T, eps, temperature, ops)``.

    ``run`` computes the loop eagerly, unless ``capture`` (CUDA only) recorded it: then
    ``run`` copies z_T, eps and the scaled table into the graph's static buffers, replays
    it and returns a copy of its output.
    """

    def __init__(self, prior, n: int, ops, steps: int | None = None):
        if n < 1:
            raise ValueError(f"number of samples must be positive, got {n}")
        self.unet, self.ops, self.n = prior.unet, ops, int(n)
        self.S = prior.T if steps is None else int(steps)
        self.shape = (int(n),) + tuple(prior.shape)
        self.source = prior.coefficients  # the prior's table: the loop's own is built from it
        self.coefficients = prior.step_table(self.S)
        dev, dtype = self.coefficients.device, self.coefficients.dtype
        # Built on the device (a host copy cannot be recorded inside another capture); t of
        # step k exactly as the reference builds it, torch.full((n,), (i+1)/S).
        self.rows = torch.arange(self.S - 1, -1, -1, device=dev)
        self.t = torch.stack([torch.full((self.n,), (i + 1) / self.S, dtype=dtype, device=dev)
                              for i in range(self.S - 1, -1, -1)])
        self.graph = None
        self._static = None  # (z_T, eps, coef, out) of the captured graph
        self._captured_signature = None

    @property
    def device(self) -> torch.device:
        return self.coefficients.device

    def scaled_coefficients(self, temperature: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The coefficient table with its c_noise column times ``temperature``: the kernel's
        ``c_noise * temperature`` product, rounded as the kernel rounds it."""
        out = self.coefficients.clone() if out is None else out.copy_(self.coefficients)
        out[:, 4].mul_(float(temperature))
        return out

    def loop(self, z: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """The S steps from z_T = ``z`` with the per-step noise ``eps`` (S, n, ...) and the
        scaled table ``coef``: the code a capture records."""
        for k in range(self.S):
            z = self.ops.ddpm_step(z, self.unet(z, self.t[k]), eps[k], coef, self.rows[k], 1.0)
        return z

    def _check(self, z_T: torch.Tensor, eps: torch.Tensor) -> None:
        if tuple(z_T.shape) != self.shape or tuple(eps.shape) != (self.S,) + self.shape:
            raise ValueError(f"PriorLoop for n={self.n}, {self.S} steps: expected z_T {self.shape} and eps "
                             f"{(self.S,) + self.shape}, got {tuple(z_T.shape)} and {tuple(eps.shape)}")

    def signature(self) -> tuple:
        return _signature(self.unet, self.source, self.coefficients) + (self.unet.training,)

    def stale(self) -> bool:
        """True when the prior's tensors moved since the capture (the graph would read
        freed memory) or its train/eval mode changed."""
        return self._captured_signature is not None and self._captured_signature != self.signature()

    @property
    def replays(self) -> bool:
        """True when ``run`` replays the captured graph."""
        return (self.graph is not None and not self.stale() and not capturing(self.device))

    @torch.no_grad()
    def run(self, z_T: torch.Tensor, eps: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """u after the S steps from ``z_T`` (n, ...) with the step noise ``eps`` (S, n, ...)."""
        self._check(z_T, eps)
        if not self.replays:
            return self.loop(z_T, eps, self.scaled_coefficients(temperature))
        z_s, eps_s, coef_s, out = self._static
        z_s.copy_(z_T)
        eps_s.copy_(eps)
        self.scaled_coefficients(temperature, out=coef_s)
        self.graph.replay()
        return out.clone()  # a later replay overwrites ``out``

    def capture(self, warmup: int = 1) -> "PriorLoop":
        """Record the loop in a CUDA graph over static input buffers (CUDA only)."""
        if self.device.type != "cuda":
            raise RuntimeError(f"PriorLoop.capture needs the prior on a CUDA device, not "
                               f"{self.device}; run() computes the loop eagerly there")
        if capturing(self.device):
            raise RuntimeError("PriorLoop.capture cannot run inside another graph capture")
        like = self.coefficients
        z_s = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        eps_s = torch.zeros((self.S,) + self.shape, dtype=like.dtype, device=like.device)
        coef_s = self.scaled_coefficients(1.0)
        self.graph = None
        self.graph, out = _warm_up_and_capture(lambda: self.loop(z_s, eps_s, coef_s), warmup)
        self._static = (z_s, eps_s, coef_s, out)
        self._captured_signature = self.signature()
        return self


# Captured loops per prior (weakly: a loop holds the UNet, never the prior), newest last;
# each graph keeps its own memory pool, so only a few (batch size, steps) pairs are kept.
_LOOPS: "weakref.WeakKeyDictionary[nn.Module, collections.OrderedDict]" = weakref.WeakKeyDictionary()
MAX_LOOPS_PER_PRIOR = 4


def cached_prior_loop(prior, n: int, ops, steps: int | None = None) -> PriorLoop:
    """The PriorLoop of (prior, n, steps, provider, device, dtype, mode), kept per prior (LRU)."""
    loops = _LOOPS.setdefault(prior, collections.OrderedDict())
    c = prior.coefficients
    steps = prior.T if steps is None else int(steps)
    key = (int(n), steps, type(ops), getattr(ops, "name", None), c.device, c.dtype, prior.training)
    loop = loops.get(key)
    if loop is None or loop.unet is not prior.unet or loop.source is not c or loop.stale():
        loop = loops[key] = PriorLoop(prior, n, ops, steps)
    loop.ops = ops  # another instance of the same provider computes the same
    loops.move_to_end(key)
    while len(loops) > MAX_LOOPS_PER_PRIOR:
        loops.popitem(last=False)
    return loop


def sample_prior_loop(prior, z: torch.Tensor, eps: torch.Tensor, temperature: float, ops) -> torch.Tensor:
    """The prior's ancestral loop from ``z`` with the step noise ``eps`` (S, n, ...) through
    ``ops``: S = len(eps) steps.

    On CUDA (unless ``prior_graphs(False)``) the loop for this batch size and S is captured
    once and replayed; inside another capture (a whole-sample graph) it is recorded into
    that graph instead; elsewhere it runs eagerly. Every path computes ``PriorLoop.loop``.
    """
    n, steps = z.shape[0], eps.shape[0]
    if capturing(z.device):
        return PriorLoop(prior, n, ops, steps).run(z, eps, temperature)
    loop = cached_prior_loop(prior, n, ops, steps)
    if z.device.type == "cuda" and _PRIOR_GRAPHS.get() and (loop.graph is None or loop.stale()):
        loop.capture()
    return loop.run(z, eps, temperature)


# ----------------------------------------------------------------------------- whole sample
class GraphSampler:
    """Captures ``sample()`` (a no-argument callable returning images) in a CUDA graph;
    ``run()`` replays it.

    The captured draws come from the CUDA default generator, whose offset CUDA graphs
    advance on every replay, so each replay gives fresh samples (the same ones an eager
    call would give from the same generator state). Outputs are cloned so that later
    replays do not overwrite what a caller holds. ``watch``: a module whose tensors the
    graph reads; ``stale()`` says when they moved.
    """

    def __init__(self, sample, warmup: int = 2, watch: nn.Module | None = None):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphSampler needs a CUDA device")
        self.watch = watch
        self.signature = _signature(watch) if watch is not None else ()
        self.graph, self.static_out = _warm_up_and_capture(sample, warmup)

    def stale(self) -> bool:
        return self.watch is not None and _signature(self.watch) != self.signature

    def run(self) -> torch.Tensor:
        self.graph.replay()
        return self.static_out.clone()
