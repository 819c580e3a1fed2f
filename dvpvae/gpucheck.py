"""Check the CUDA build of DVP-VAE on one GPU, and time it: ``python -m dvpvae.gpucheck``.

    python -m dvpvae.gpucheck                    # every check, report in ./gpucheck.json
    python -m dvpvae.gpucheck --dry-run          # list the checks and their time budgets
    python -m dvpvae.gpucheck --presets mnist --json out.json

Checks, in order (``--dry-run`` lists them with their budgets; about 8 minutes in all on
one H100/H200-class GPU, most of it torch.compile):

* environment: the CUDA device, Triton and its probe launch (``best_ops`` gives the triton
  provider), TRITON_INTERPRET unset;
* kernels: every Triton kernel, forward and backward, fp32 and fp64, against its ``_ref``
  on CUDA tensors, three-way against float64;
* prior loop: ``PriorLoop`` eager and replayed against the reference Python loop;
* per preset (mnist and cifar10): FastDVPVAE against DVPVAE with the same draws (training
  loss, rec, KL and every gradient; eval mode; estimate_nll; sample), three-way against a
  float64 copy of the reference; CUDA-graph replay against eager execution (whole-sample
  sampler, eval and NLL passes); then the timings of train / eval / nll / sample for both
  models: images/s, peak CUDA memory, TFLOP/s and % of the device's fp32 peak;
* bandwidth: each kernel's achieved GB/s against a device-to-device copy, and a measured
  fp32 matmul.

Three-way comparison: the fast model's float32 result and the reference's are both compared
with the float64 reference; the fast one passes when its error is at most ``factor`` times
the reference's own plus a floor relative to the largest value. TF32 is switched off for
the whole run, so both float32 sides round as float32 does.

Writes one JSON report and prints a short table. Exit status: 0 all checks passed, 1 a
mismatch or an error, 2 no CUDA GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from dvpvae.noise import Noise

TOTAL_BUDGET_S = 480  # the whole run on one H100/H200-class GPU
DEFAULT_PRESETS = ("mnist", "cifar10")
MODEL_FACTOR = 8.0  # fast vs reference error ratio of the model checks (tests/test_fast.py)
KERNEL_FACTOR = 4.0  # kernel vs same-dtype reference error ratio (the CUDA references sum
# in other orders than the CPU ones the kernel tests use)

# Batch sizes per preset: parity and timing use the same shapes, so each pass compiles once.
SIZES = {
    "mnist": dict(batch=128, nll_images=16, k=64, sample_n=128),
    "omniglot": dict(batch=128, nll_images=16, k=64, sample_n=128),
    "cifar10": dict(batch=64, nll_images=8, k=32, sample_n=64),
    "tiny": dict(batch=4, nll_images=2, k=3, sample_n=3),
}
# Budgets (seconds) of the per-preset steps; compile time dominates parity.
PRESET_BUDGETS = {"mnist": dict(parity=90, graphs=15, timing=30),
                  "omniglot": dict(parity=100, graphs=15, timing=30),
                  "cifar10": dict(parity=150, graphs=20, timing=40),
                  "tiny": dict(parity=30, graphs=10, timing=10)}

# Dense fp32 (CUDA-core, no tensor cores) peaks in TFLOP/s by device name, first match wins
# (more specific names first); other devices use the measured fp32 matmul.
FP32_PEAK_TFLOPS = (
    ("H100 PCIe", 51.2), ("H100 NVL", 60.0), ("H100", 67.0), ("GH200", 67.0),
    ("H200 NVL", 60.0), ("H200", 67.0), ("B200", 80.0), ("A100", 19.5), ("L40S", 91.6),
    ("L40", 90.5), ("L4", 30.3), ("A10G", 31.2), ("A10", 31.2), ("A40", 37.4), ("V100", 15.7),
    ("T4", 8.1),
)


def known_fp32_peak(device_name: str) -> float | None:
    """The table's dense fp32 peak (TFLOP/s) for ``device_name``, or None."""
    for key, tflops in FP32_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


# ============================================================================ comparisons
@dataclass
class Comparison:
    """One compared quantity: ``err`` (the checked value's error) must not exceed ``bound``."""

    name: str
    err: float
    bound: float
    err_ref: float | None = None  # the same-dtype reference's error, for three-way checks

    @property
    def ok(self) -> bool:
        return self.err <= self.bound  # False for NaN

    @property
    def ratio(self) -> float:
        return self.err / self.bound if self.bound > 0 else (0.0 if self.err == 0 else math.inf)

    def describe(self) -> str:
        ref = f", reference {self.err_ref:.3g}" if self.err_ref is not None else ""
        return f"{self.name}: error {self.err:.3g}{ref}, bound {self.bound:.3g}"


def _error(a: torch.Tensor, b: torch.Tensor, quantile: float | None = None) -> float:
    """Max |a - b| (or its ``quantile``) in float64; inf on a shape mismatch, NaN if a has
    NaN where b has none."""
    if a.shape != b.shape:
        return math.inf
    a, b = a.detach().double(), b.detach().double()
    if (torch.isnan(a) & ~torch.isnan(b)).any():
        return math.nan
    d = (a - b).abs().nan_to_num(0.0).flatten()
    if d.numel() == 0:
        return 0.0
    if quantile is not None:
        return float(torch.quantile(d.cpu(), quantile))
    return float(d.max())


def three_way(name: str, fast: torch.Tensor, ref: torch.Tensor, exact: torch.Tensor, factor: float,
              floor: float, quantile: float | None = None) -> Comparison:
    """``fast`` passes when its error w.r.t. ``exact`` (float64) is at most ``factor`` times
    ``ref``'s (the same-dtype reference) plus ``floor``. ``quantile``: compare that quantile
    of the elementwise errors instead of the max (for sampled images, where a rare argmax
    tie may pick another mixture component)."""
    err_ref = _error(ref, exact, quantile)
    return Comparison(name, _error(fast, exact, quantile), factor * err_ref + floor, err_ref)


def close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float,
          quantile: float | None = None) -> Comparison:
    """|got - want| <= atol + rtol * max|want| (max, or the ``quantile`` of the errors)."""
    scale = float(want.detach().double().abs().max()) if want.numel() else 0.0
    return Comparison(name, _error(got, want, quantile), atol + rtol * scale)


def failed(comparisons) -> list[Comparison]:
    return [c for c in comparisons if not c.ok]


class Tape(Noise):
    """Records every draw in order; ``replay()`` gives a Noise returning the same draws in the
    same order (cast to the caller's dtype and device), so a float64 copy of a model gets
    exactly the float32 draws, and a name drawn twice (estimate_nll's ``binarize``) works."""

    def __init__(self, generator: torch.Generator | None = None, tape=None):
        super().__init__(generator=generator)
        self.tape = [] if tape is None else None
        self._queue = deque(tape) if tape is not None else None

    def replay(self) -> "Tape":
        if self.tape is None:
            raise RuntimeError("replay() of a replaying Tape")
        return Tape(tape=self.tape)

    def _draw(self, kind, name, shape, like, fresh):
        if self._queue is None:
            t = fresh(name, shape, like)
            self.tape.append((kind, name, t.detach().clone()))
            return t
        if not self._queue:
            raise ValueError(f"draw {name!r} beyond the end of the recorded tape")
        k, n, t = self._queue.popleft()
        if (k, n, tuple(t.shape)) != (kind, name, tuple(torch.Size(shape))):
            raise ValueError(f"draw {kind} {name!r} {tuple(shape)} does not match the tape's "
                             f"{k} {n!r} {tuple(t.shape)}")
        return t.to(device=like.device, dtype=like.dtype)

    def normal(self, name, shape, like):
        return self._draw("normal", name, shape, like, super().normal)

    def uniform(self, name, shape, like, low=0.0, high=1.0):
        return self._draw("uniform", name, shape, like,
                          lambda n, s, l: super(Tape, self).uniform(n, s, l, low, high))


# ============================================================================ models
def perturbed_model(preset: str, seed: int = 0, n_images: int = 8, device="cpu"):
    """A reference DVPVAE with every parameter perturbed by 0.05 / sqrt(fan_in) (zero-initialised
    convolutions would hide errors in their paths; the scale keeps activations O(1)), its
    dct_scale set from random images, and ``n_images`` such images in [-1, 1]."""
    from dvpvae import DVPVAE, set_dct_scale

    torch.manual_seed(seed)
    model = DVPVAE.from_preset(preset)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.add_(0.05 * torch.randn_like(p) / math.sqrt(fan_in))
    images = torch.randint(0, 256, (max(n_images, 8),) + model.config.image_shape).float() / 127.5 - 1
    set_dct_scale(model, images)
    return model.to(device), images[:n_images].to(device)


def _grads(model) -> dict:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def _forward(model, x, noise, training):
    model.train(training)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(training):
        out = model(x.to(next(model.parameters()).dtype), noise)
        if training:
            out.loss.backward()
    grads = _grads(model) if training else {}
    model.zero_grad(set_to_none=True)
    return out, grads


def forward_parity(ref, fast, x, training: bool, factor: float = MODEL_FACTOR, seed: int = 3,
                   label: str = "", keep: dict | None = None) -> list[Comparison]:
    """Loss, rec, KL (and with ``training`` every parameter gradient) of ``fast`` against
    ``ref``, three-way with a float64 copy of ``ref``, all on the same draws. ``keep``
    receives the tape and fast's output."""
    tape = Tape(generator=torch.Generator().manual_seed(seed))
    ref.train(training)
    with torch.no_grad():
        ref(x, tape)
    oracle = copy.deepcopy(ref).double()
    o64, g64 = _forward(oracle, x.double(), tape.replay(), training)
    del oracle
    o32, g32 = _forward(ref, x, tape.replay(), training)
    of, gf = _forward(fast, x, tape.replay(), training)
    if keep is not None:
        keep.update(tape=tape, out=of)
    mode = "train" if training else "eval"
    grad_scale = max((float(g.abs().max()) for g in g64.values()), default=0.0)
    out = []
    for name in ("loss", "rec", "kl"):
        exact = getattr(o64, name).detach()
        out.append(three_way(f"{label}{mode} {name}", getattr(of, name), getattr(o32, name), exact,
                             factor, 1e-6 * float(exact.abs().max()) + 1e-7))
    for name, exact in g64.items():
        if name not in gf or name not in g32:
            out.append(Comparison(f"{label}grad {name} missing", math.inf, 0.0))
            continue
        out.append(three_way(f"{label}grad {name}", gf[name], g32[name], exact, factor,
                             1e-6 * grad_scale + 1e-7))
    return out


def nll_parity(ref, fast, x, k: int, factor: float = MODEL_FACTOR, seed: int = 1,
               label: str = "") -> tuple[list[Comparison], torch.Tensor, Tape]:
    """estimate_nll of ``fast`` against ``ref`` on the same draws (one chunk of len(x)*k rows),
    three-way with float64; also returns fast's value and the tape."""
    chunk = x.shape[0] * k
    tape = Tape(generator=torch.Generator().manual_seed(seed))
    want32 = ref.estimate_nll(x, k, chunk_size=chunk, noise=tape)
    oracle = copy.deepcopy(ref).double()
    want64 = oracle.estimate_nll(x.double(), k, chunk_size=chunk, noise=tape.replay())
    del oracle
    got = fast.estimate_nll(x, k, chunk_size=chunk, noise=tape.replay())
    floor = 1e-6 * float(want64.abs().max()) + 1e-7
    return [three_way(f"{label}estimate_nll", got, want32, want64, factor, floor)], got, tape


def sample_parity(ref, fast, n: int, factor: float = MODEL_FACTOR, seed: int = 4, temperature: float = 0.8,
                  prior_temperature: float = 0.9, label: str = "") -> list[Comparison]:
    """Pseudoinputs u and images of ``fast.sample`` against ``ref.sample`` with the same draws,
    three-way with float64 (images: the 99.9% quantile of the errors)."""
    ref.eval()
    tape = Tape(generator=torch.Generator().manual_seed(seed))
    want32 = ref.sample(n, temperature, noise=tape, prior_temperature=prior_temperature)
    oracle = copy.deepcopy(ref).double()
    want64 = oracle.sample(n, temperature, noise=tape.replay(), prior_temperature=prior_temperature)
    u64 = oracle.sample_pseudoinputs(n, prior_temperature, tape.replay())
    del oracle
    u32 = ref.sample_pseudoinputs(n, prior_temperature, tape.replay())
    u_fast = fast.sample_pseudoinputs(n, prior_temperature, tape.replay())
    got = fast.sample(n, temperature, noise=tape.replay(), prior_temperature=prior_temperature)
    return [three_way(f"{label}sample u", u_fast, u32, u64, factor, 1e-6 * float(u64.abs().max()) + 1e-7),
            three_way(f"{label}sample images", got, want32, want64, factor, 1e-6, quantile=0.999)]


# ============================================================================ kernels
@dataclass
class KernelCase:
    op: str
    label: str
    fn: Callable
    ref: Callable
    make: Callable  # () -> (args with float tensors in float64 on the CPU, indices of differentiable args)
    rel: float  # atol = rel * (1 + max|fp64 value|) for fp32


def _g(seed):
    return torch.Generator().manual_seed(seed)


def kernel_cases(small: bool = False, bandwidth: bool = False) -> list[KernelCase]:
    """The kernel checks: preset shapes and odd ones (``small``: a few tiny shapes, for the
    Triton interpreter; ``bandwidth``: one case per op with millions of elements, enough to
    keep a large GPU's memory system busy)."""
    def pick(tiny, full, big):
        return big if bandwidth else tiny if small else full

    from dvpvae.kernels.conv1x1_act import ACTIVATIONS, conv1x1_act, conv1x1_act_ref
    from dvpvae.kernels.conv1x1_residual import conv1x1_residual, conv1x1_residual_ref
    from dvpvae.kernels.dct_pseudoinput import (dct_pseudoinput, dct_pseudoinput_ref, idct_pseudoinput,
                                                idct_pseudoinput_ref)
    from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step, ddpm_step_ref
    from dvpvae.kernels.reparam_kl import MAX_LOGVAR, reparam_kl, reparam_kl_ref, reparam_sample, reparam_sample_ref

    cases = []
    latent = pick([(2, 1, 5, 5), (3, 2, 3, 7)], [(64, 3, 32, 32), (250, 1, 14, 14), (5, 3, 5, 13), (7, 11)],
                  [(1024, 4, 32, 32)])
    for i, shape in enumerate(latent):
        def make_kl(shape=shape, i=i):
            g = _g(10 + i)
            mu_q, mu_p, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
            lq, lp = (torch.rand(shape, generator=g, dtype=torch.float64) * (MAX_LOGVAR + 13.5) - 12.0
                      for _ in range(2))
            return [mu_q, lq, mu_p, lp, eps, -10.0], [0, 1, 2, 3, 4]
        cases.append(KernelCase("reparam_kl", _shape(shape), reparam_kl, reparam_kl_ref, make_kl, 1e-6))

        def make_s(shape=shape, i=i):
            g = _g(20 + i)
            mu, eps = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
            lp = torch.rand(shape, generator=g, dtype=torch.float64) * 13.5 - 12.0
            # sqrt(temperature) reaches the kernel as an fp32 argument: 0.25 keeps it exact for fp64.
            return [mu, lp, eps, -10.0, 0.25], [0, 1, 2]
        cases.append(KernelCase("reparam_sample", _shape(shape), reparam_sample, reparam_sample_ref, make_s, 1e-6))

    pseudo = pick([((2, 1, 5, 5), (5, -6.0, 7.0))],
                  [((500, 1, 7, 7), (25, -6.0, 7.0)), ((512, 3, 7, 7), (25, -10.0, 7.0)),
                   ((3, 1, 5, 5), (50, -6.0, 7.0))],
                  [((4096, 1, 32, 32), (25, -6.0, 7.0))])
    for i, (shape, sched) in enumerate(pseudo):
        for kind in ("tensor",) if bandwidth else ("int", "tensor"):
            def make_d(shape=shape, sched=sched, kind=kind, i=i):
                g = _g(30 + i)
                z, e, nz = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
                coef = ddpm_coefficients(*sched, dtype=torch.float64)
                row = sched[0] // 2
                return [z, e, nz, coef, row if kind == "int" else torch.tensor(row), 0.75], [0, 1, 2]
            cases.append(KernelCase("ddpm_step", f"{_shape(shape)} step {kind}", ddpm_step, ddpm_step_ref,
                                    make_d, 1e-6))

    planes = pick([(2, 1, 12, 12, 5), (1, 2, 7, 9, 3)],
                  [(250, 1, 28, 28, 7), (128, 3, 32, 32, 7), (2, 1, 28, 28, 5), (1, 2, 13, 11, 3)],
                  [(1024, 3, 32, 32, 7)])
    for i, (n, c, h, w, k) in enumerate(planes):
        def make_f(n=n, c=c, h=h, w=w, k=k, i=i):
            g = _g(40 + i)
            return [torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1, _dct_scale(g, c, k), k], [0]

        def make_i(n=n, c=c, h=h, w=w, k=k, i=i):
            g = _g(50 + i)
            return [torch.rand(n, c, k, k, generator=g, dtype=torch.float64) * 2 - 1, _dct_scale(g, c, k), (h, w)], [0]
        cases.append(KernelCase("dct_pseudoinput", f"{n}x{c}x{h}x{w}->{k}", dct_pseudoinput,
                                dct_pseudoinput_ref, make_f, 1e-5))
        cases.append(KernelCase("idct_pseudoinput", f"{n}x{c}x{k}x{k}->{h}x{w}", idct_pseudoinput,
                                idct_pseudoinput_ref, make_i, 1e-5))

    convs = pick([((2, 6, 5, 3, 4), ("silu", "gelu"))],
                 [((32, 128, 96, 32, 32), ("silu",)), ((16, 32, 32, 14, 14), ("silu",)),
                  ((2, 33, 32, 7, 7), ACTIVATIONS), ((1, 17, 13, 11, 13), ("gelu", "none")),
                  ((4, 3, 128, 32, 32), ("none",))],
                 [((128, 128, 96, 32, 32), ("silu",))])
    for i, ((n, cin, cout, h, w), acts) in enumerate(convs):
        for act in acts:
            def make_c(n=n, cin=cin, cout=cout, h=h, w=w, act=act, i=i):
                g = _g(60 + i)
                x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
                wt = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64) / cin ** 0.5
                b = torch.randn(cout, generator=g, dtype=torch.float64) * 0.5
                return [x, wt, b, act], [0, 1, 2]
            cases.append(KernelCase("conv1x1_act", f"{n}x{cin}x{h}x{w}->{cout} {act}", conv1x1_act,
                                    conv1x1_act_ref, make_c, 1e-5))

    residual = pick([((2, 5, 6, 3, 4), "tensor")],
                    [((32, 96, 128, 32, 32), "float"), ((2, 32, 33, 7, 7), "tensor"), ((1, 13, 17, 11, 13), "float")],
                    [((128, 96, 128, 32, 32), "float")])
    for i, ((n, cin, cout, h, w), gate) in enumerate(residual):
        def make_r(n=n, cin=cin, cout=cout, h=h, w=w, gate=gate, i=i):
            g = _g(70 + i)
            x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
            wt = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64) / cin ** 0.5
            b = torch.randn(cout, generator=g, dtype=torch.float64) * 0.5
            skip = torch.randn(n, cout, h, w, generator=g, dtype=torch.float64)
            return [x, wt, b, skip, 0.3 if gate == "float" else torch.tensor([0.3], dtype=torch.float64)], [0, 1, 2, 3]
        cases.append(KernelCase("conv1x1_residual", f"{n}x{cin}x{h}x{w}->{cout} gate {gate}", conv1x1_residual,
                                conv1x1_residual_ref, make_r, 1e-5))
    return cases


def _dct_scale(g, c, k):
    """A positive (c, k, k) scale: a large DC entry, as data give, and AC entries small enough
    that some coefficients clamp."""
    s = torch.rand(c, k, k, generator=g, dtype=torch.float64) * 2 + 0.05
    s[:, 0, 0] = 20.0
    return s


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _outputs(y) -> tuple:
    return tuple(y) if isinstance(y, (tuple, list)) else (y,)


def _call(fn, args, diff, dtype, device, grads=None):
    """fn on ``args`` cast to ``dtype`` on ``device``; with ``grads`` (float64 output
    gradients) also the gradients of the differentiable args."""
    cast = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            a = a.to(device=device, dtype=dtype if a.is_floating_point() else a.dtype)
            if grads is not None and i in diff:
                a.requires_grad_(True)
        cast.append(a)
    with torch.set_grad_enabled(grads is not None):
        outs = _outputs(fn(*cast))
        if grads is None:
            return [o.detach() for o in outs], []
        leaves = [cast[i] for i in diff]
        cast_grads = [g.to(device=device, dtype=o.dtype) for g, o in zip(grads, outs, strict=True)]
        gs = torch.autograd.grad(outs, leaves, cast_grads)
    return [o.detach() for o in outs], list(gs)


def check_kernel_case(case: KernelCase, device, dtype=torch.float32) -> list[Comparison]:
    """Forward and backward of ``case`` in ``dtype`` on ``device``: the kernel three-way
    against its reference in ``dtype`` and in float64."""
    args, diff = case.make()
    hi, _ = _call(case.ref, args, diff, torch.float64, device)
    gen = _g(99)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in hi]
    hi, ghi = _call(case.ref, args, diff, torch.float64, device, grads)
    lo, glo = _call(case.ref, args, diff, dtype, device, grads)
    got, ggot = _call(case.fn, args, diff, dtype, device, grads)
    rel = case.rel if dtype != torch.float64 else 1e-12
    name = f"{case.op} {case.label} {str(dtype).replace('torch.', '')}"
    out = []
    for j, (a, r, e) in enumerate(zip(got, lo, hi, strict=True)):
        out.append(three_way(f"{name} out{j}", a, r, e, KERNEL_FACTOR, rel * (1 + float(e.abs().max()))))
    for j, (a, r, e) in enumerate(zip(ggot, glo, ghi, strict=True)):
        out.append(three_way(f"{name} grad arg{diff[j]}", a, r, e, KERNEL_FACTOR, rel * (1 + float(e.abs().max()))))
    return out


def check_kernels(device, small: bool = False, progress: "Progress | None" = None) -> list[Comparison]:
    cases = kernel_cases(small)
    out = []
    for i, case in enumerate(cases):
        for dtype in (torch.float32, torch.float64):
            out += check_kernel_case(case, device, dtype)
        if progress is not None:
            progress.tick(i + 1, len(cases), "kernel cases")
    return out


# ============================================================================ timing
def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable, device, warmup: int = 1, min_repeats: int = 3, max_repeats: int = 10,
            max_seconds: float = 5.0) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: at least ``min_repeats`` timings,
    more until ``max_repeats`` or ``max_seconds``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory_mb(fn: Callable, device) -> float | None:
    """Peak CUDA memory of one call of ``fn`` above what was allocated before it (None off CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def count_flops(fn: Callable) -> int:
    """FLOPs of one call (convolutions, matmuls, attention: torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_tflops(device, n: int = 8192) -> float:
    """Measured fp32 square-matmul rate (TF32 off)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with _no_tf32():
        times = measure(lambda: a @ b, device, warmup=2, min_repeats=5, max_repeats=10, max_seconds=3)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def copy_bandwidth(device, numel: int = 64 * 2 ** 20) -> float:
    """Measured device-to-device copy bandwidth in GB/s (bytes read + written)."""
    a = torch.empty(numel, device=device)
    b = torch.empty_like(a)
    times = measure(lambda: b.copy_(a), device, warmup=2, min_repeats=5, max_repeats=20, max_seconds=2)
    return 2 * a.numel() * a.element_size() / statistics.median(times) / 1e9


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def kernel_bandwidth(device, copy_gbs: float, progress: "Progress | None" = None) -> list[dict]:
    """Forward GB/s of each kernel on millions of fp32 elements (the bytes it must read and
    write once per call), and its fraction of the copy bandwidth."""
    cases = kernel_cases(bandwidth=True)
    rows = []
    for i, case in enumerate(cases):
        args, _ = case.make()
        args = [a.to(device=device, dtype=torch.float32 if a.is_floating_point() else a.dtype)
                if isinstance(a, torch.Tensor) else a for a in args]
        with torch.no_grad():
            outs = _outputs(case.fn(*args))
            times = measure(lambda fn=case.fn, args=args: fn(*args), device, warmup=2, min_repeats=5,
                            max_repeats=50, max_seconds=1)
        moved = _nbytes(*args) + _nbytes(*outs)
        gbs = moved / statistics.median(times) / 1e9
        rows.append(dict(op=case.op, shape=case.label, bytes=moved, ms=statistics.median(times) * 1e3,
                         gb_per_s=gbs, pct_of_copy=100 * gbs / copy_gbs if copy_gbs else None))
        if progress is not None:
            progress.tick(i + 1, len(cases), "kernels timed")
    return rows


# ============================================================================ the run
class Progress:
    """Step headers with the remaining budget as ETA, and per-item ticks inside long steps."""

    def __init__(self, total_budget: float, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.remaining = float(total_budget)
        self._step_start = self.start
        self._last_tick = 0.0

    def say(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def begin(self, index: int, count: int, name: str, budget: float) -> None:
        elapsed = time.perf_counter() - self.start
        self.say(f"[{index}/{count}] {name} (budget {budget:.0f} s; elapsed {_mmss(elapsed)}, "
                 f"ETA {_mmss(self.remaining)})")
        self._step_start = time.perf_counter()
        self._last_tick = 0.0

    def end(self, budget: float) -> None:
        self.remaining = max(0.0, self.remaining - budget)

    def tick(self, done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        if done < total and now - self._last_tick < 5.0:
            return
        self._last_tick = now
        spent = now - self._step_start
        left = spent / done * (total - done) if done else float("nan")
        self.say(f"    {what} {done}/{total}, {spent:.0f} s, ~{left:.0f} s left in this step")


def _mmss(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass
class Step:
    name: str
    budget: float
    what: str
    run: Callable  # (Context) -> list[Comparison]
    cuda_only: bool = False
    fatal: bool = False  # a failure skips the remaining steps


@dataclass
class StepResult:
    name: str
    status: str  # pass / fail / error / skipped
    seconds: float
    budget: float
    compared: int = 0
    worst: str | None = None
    failures: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Context:
    device: torch.device
    presets: tuple = DEFAULT_PRESETS
    compile: bool = True  # FastDVPVAE's torch.compile (off in the CPU self-test)
    small_kernels: bool = False
    timing_seconds: float = 3.0  # per (model, task)
    progress: Progress | None = None
    report: dict = field(default_factory=dict)
    _models: dict = field(default_factory=dict)
    _peak: tuple | None = None

    def models(self, preset: str):
        """(reference, fast, images) of ``preset`` on the device, built once."""
        if preset not in self._models:
            from dvpvae import FastDVPVAE

            ref, x = perturbed_model(preset, seed=0, n_images=SIZES[preset]["batch"], device=self.device)
            fast = FastDVPVAE.from_reference(ref, compile=self.compile)
            self._models[preset] = (ref, fast, x)
        return self._models[preset]

    def fp32_peak(self) -> tuple[float, str]:
        """(dense fp32 peak TFLOP/s, its source): the table by device name, else measured."""
        if self._peak is None:
            name = _device_name(self.device)
            known = known_fp32_peak(name) if self.device.type == "cuda" else None
            if known is not None:
                self._peak = (known, f"table ({name})")
            elif self.device.type == "cuda":
                self._peak = (matmul_tflops(self.device), "measured fp32 matmul")
            else:
                self._peak = (matmul_tflops(self.device, 1024), "measured fp32 matmul")
        return self._peak


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


# ------------------------------------------------------------------ steps
def step_environment(ctx: Context) -> list[Comparison]:
    from dvpvae.cuda_graphs import min_compute_capability, triton_unsupported_reason
    from dvpvae.kernels._triton import triton

    dev = ctx.device
    env = dict(device=str(dev), device_name=_device_name(dev), torch=torch.__version__,
               cuda=torch.version.cuda, triton=getattr(triton, "__version__", None),
               triton_interpret=os.environ.get("TRITON_INTERPRET"))
    out = [Comparison("TRITON_INTERPRET unset (kernels compiled, not interpreted)",
                      float(os.environ.get("TRITON_INTERPRET", "0") == "1"), 0.0)]
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(compute_capability=list(torch.cuda.get_device_capability(dev)),
                   memory_gb=props.total_memory / 2 ** 30, multiprocessors=props.multi_processor_count,
                   triton_min_capability=list(min_compute_capability()))
        reason = triton_unsupported_reason(dev)
        env["triton_unsupported_reason"] = reason
        out.append(Comparison(f"Triton kernels run on this GPU ({reason or 'probe passed'})",
                              float(reason is not None), 0.0))
    ctx.report["environment"] = env
    return out


def step_kernels(ctx: Context) -> list[Comparison]:
    return check_kernels(ctx.device, ctx.small_kernels, ctx.progress)


def step_prior_loop(ctx: Context) -> list[Comparison]:
    """PriorLoop (the Triton provider's sampler) against the reference Python loop with the
    same noise, and on CUDA its graph replay against its eager run."""
    from dvpvae.cuda_graphs import PriorLoop
    from dvpvae.ops import REFERENCE, TritonOps

    out = []
    for preset in ctx.presets:
        ref, _, _ = ctx.models(preset)
        prior = ref.prior.eval()
        n = SIZES[preset]["sample_n"]
        z, eps = prior.sampling_noise(n, Noise(generator=_g(5)))
        with torch.no_grad():
            want = prior.sample_loop(z, eps, 0.7, REFERENCE)
            loop = PriorLoop(prior, n, TritonOps())
            eager = loop.run(z, eps, 0.7)
            out.append(close(f"{preset} prior loop (eager, triton) vs reference loop", eager, want, 1e-4, 1e-5))
            if ctx.device.type == "cuda":
                loop.capture()
                for temperature in (0.7, 1.0):
                    replay = loop.run(z, eps, temperature)
                    eager = PriorLoop(prior, n, TritonOps()).run(z, eps, temperature)
                    out.append(close(f"{preset} prior loop replay vs eager, temperature {temperature}",
                                     replay, eager, 1e-5, 1e-6))
                z2, eps2 = prior.sampling_noise(n, Noise(generator=_g(6)))
                out.append(close(f"{preset} prior loop replay with new inputs vs reference",
                                 loop.run(z2, eps2, 0.7), prior.sample_loop(z2, eps2, 0.7, REFERENCE), 1e-4, 1e-5))
    return out


def step_parity(preset: str):
    def run(ctx: Context) -> list[Comparison]:
        ref, fast, x = ctx.models(preset)
        s = SIZES[preset]
        out = []
        for i, (what, fn) in enumerate([
                ("train", lambda: forward_parity(ref, fast, x, True, label=f"{preset} ")),
                ("eval", lambda: forward_parity(ref, fast, x, False, label=f"{preset} ",
                                                keep=ctx._models.setdefault(preset + "/eval", {}))),
                ("nll", lambda: _nll_and_keep(ctx, preset, ref, fast, x[:s["nll_images"]], s["k"])),
                ("sample", lambda: sample_parity(ref, fast, s["sample_n"], label=f"{preset} "))]):
            out += fn()
            if ctx.progress is not None:
                ctx.progress.tick(i + 1, 4, f"{preset} passes ({what} done)")
        return out
    return run


def _nll_and_keep(ctx, preset, ref, fast, x, k):
    comps, got, tape = nll_parity(ref, fast, x, k, label=f"{preset} ")
    ctx._models[preset + "/nll"] = (got, tape)  # the compiled pass's first (eager warm-up) result
    return comps


def step_graphs(preset: str):
    def run(ctx: Context) -> list[Comparison]:
        """Replays equal eager runs: the whole-sample graph against the same call uncompiled
        from the same CUDA RNG state; the eval and NLL passes (CUDA graphs of the compiled
        code) recorded and replayed against their first call in the parity step, which ran
        the compiled code eagerly (CUDA-graph trees warm up before recording)."""
        from dvpvae import FastDVPVAE

        ref, fast, x = ctx.models(preset)
        s = SIZES[preset]
        ref.eval(), fast.eval()
        out = []
        eager_model = FastDVPVAE.from_reference(ref, compile=False, cuda_graphs=False)
        fast.sample(s["sample_n"])  # capture
        for seed in (11, 12):
            torch.cuda.manual_seed(seed)
            replay = fast.sample(s["sample_n"])
            torch.cuda.manual_seed(seed)
            eager = eager_model.sample(s["sample_n"])
            out.append(close(f"{preset} whole-sample graph vs eager (seed {seed})", replay, eager, 1e-4, 1e-5,
                             quantile=0.999))
        kept = ctx._models.get(preset + "/eval")
        if kept:
            fast.eval()
            with torch.no_grad():
                for i in range(3):  # record, then replays
                    got = fast(x, kept["tape"].replay())
                    for name in ("loss", "kl"):
                        out.append(close(f"{preset} eval pass call {i + 2} vs first: {name}",
                                         getattr(got, name), getattr(kept["out"], name), 1e-6, 1e-7))
        if preset + "/nll" in ctx._models:
            want, nll_tape = ctx._models[preset + "/nll"]
            xs = x[:s["nll_images"]]
            for i in range(2):
                got = fast.estimate_nll(xs, s["k"], chunk_size=xs.shape[0] * s["k"], noise=nll_tape.replay())
                out.append(close(f"{preset} nll pass call {i + 2} vs first", got, want, 1e-6, 1e-6))
        return out
    return run


def step_timing(preset: str):
    def run(ctx: Context) -> list[Comparison]:
        ref, fast, x = ctx.models(preset)
        rows = time_models(preset, {"DVPVAE": ref, "FastDVPVAE": fast}, x, ctx)
        ctx.report.setdefault("performance", []).extend(rows)
        return []
    return run


def time_models(preset: str, models: dict, x: torch.Tensor, ctx: Context) -> list[dict]:
    """Images/s, peak memory and TFLOP/s of train / eval / nll / sample for each model."""
    s, dev = SIZES[preset], ctx.device
    x_nll = x[:s["nll_images"]]
    peak, peak_source = ctx.fp32_peak()
    first = next(iter(models.values()))
    lr = first.config.lr

    def tasks(model):
        opt = torch.optim.Adamax(model.parameters(), lr=lr)

        def train():
            model.train()
            opt.zero_grad(set_to_none=True)
            model(x).loss.backward()
            opt.step()
            model.constrain_()

        def evaluate():
            model.eval()
            with torch.no_grad():
                model(x)

        return {"train": (train, x.shape[0]), "eval": (evaluate, x.shape[0]),
                "nll": (lambda: model.estimate_nll(x_nll, s["k"]), x_nll.shape[0]),
                "sample": (lambda: model.eval().sample(s["sample_n"]), s["sample_n"])}

    flops = {name: count_flops(fn) for name, (fn, _) in tasks(first).items()}
    rows = []
    jobs = [(m, t) for m in models for t in flops]
    for i, (mname, task) in enumerate(jobs):
        fn, images = tasks(models[mname])[task]
        mem = peak_memory_mb(fn, dev)
        times = measure(fn, dev, warmup=1, max_seconds=ctx.timing_seconds)
        med = statistics.median(times)
        tflops = flops[task] / med / 1e12
        rows.append(dict(preset=preset, model=mname, task=task, batch=images, images_per_s=images / med,
                         seconds_median=med, seconds_min=min(times), seconds_max=max(times), repeats=len(times),
                         peak_mem_mb=mem, flops=flops[task], tflops=tflops, pct_of_peak=100 * tflops / peak,
                         peak_tflops=peak, peak_source=peak_source))
        if ctx.progress is not None:
            ctx.progress.tick(i + 1, len(jobs), f"{preset} timings")
    for r in rows:
        base = next((b for b in rows if b["task"] == r["task"] and b["model"] == "DVPVAE"), None)
        r["speedup"] = base["seconds_median"] / r["seconds_median"] if base else None
    return rows


def step_bandwidth(ctx: Context) -> list[Comparison]:
    copy_gbs = copy_bandwidth(ctx.device)
    peak, source = ctx.fp32_peak()
    ctx.report["bandwidth"] = dict(copy_gb_per_s=copy_gbs, matmul_fp32_tflops=matmul_tflops(ctx.device),
                                   fp32_peak_tflops=peak, fp32_peak_source=source,
                                   kernels=kernel_bandwidth(ctx.device, copy_gbs, ctx.progress))
    return []


def plan(presets=DEFAULT_PRESETS) -> list[Step]:
    """Every check of a run, in order, with its time budget."""
    steps = [
        Step("environment", 20, "CUDA device, Triton version and compute capability, probe launch "
             "(best_ops gives the triton provider), TRITON_INTERPRET unset", step_environment, fatal=True),
        Step("kernels", 60, "every Triton kernel forward + backward, fp32 and fp64, vs its _ref on CUDA "
             "tensors (three-way vs float64)", step_kernels),
        Step("prior-loop", 10 * len(presets), "PriorLoop eager and captured replay vs the reference "
             "Python loop, same noise; replay == eager", step_prior_loop),
    ]
    for p in presets:
        b = PRESET_BUDGETS.get(p, PRESET_BUDGETS["cifar10"])
        steps += [
            Step(f"parity-{p}", b["parity"], f"{p}: FastDVPVAE vs DVPVAE, same draws: train loss/rec/KL "
                 "and every gradient, eval mode, estimate_nll, sample (three-way vs float64)", step_parity(p)),
            Step(f"graphs-{p}", b["graphs"], f"{p}: CUDA-graph replay == eager: whole-sample sampler, eval "
                 "and NLL passes", step_graphs(p), cuda_only=True),
            Step(f"timing-{p}", b["timing"], f"{p}: train / eval / nll / sample, DVPVAE and FastDVPVAE: "
                 "images/s, peak memory, TFLOP/s, % of fp32 peak", step_timing(p)),
        ]
    steps.append(Step("bandwidth", 15, "kernels' GB/s vs device-to-device copy; fp32 matmul TFLOP/s",
                      step_bandwidth, cuda_only=True))
    return steps


def run_steps(steps: list[Step], ctx: Context) -> list[StepResult]:
    """Run ``steps`` in order; a step fails on any comparison beyond its bound and errors on
    an exception (recorded, the run goes on unless the step is fatal)."""
    results, stop = [], None
    for i, step in enumerate(steps, 1):
        if stop is not None or (step.cuda_only and ctx.device.type != "cuda"):
            why = f"after {stop} failed" if stop is not None else "needs CUDA"
            results.append(StepResult(step.name, "skipped", 0.0, step.budget, error=why))
            if ctx.progress is not None:
                ctx.progress.end(step.budget)
            continue
        if ctx.progress is not None:
            ctx.progress.begin(i, len(steps), step.name, step.budget)
        t0 = time.perf_counter()
        try:
            comps = step.run(ctx)
            bad = failed(comps)
            worst = max(comps, key=lambda c: c.ratio if not math.isnan(c.ratio) else math.inf, default=None)
            res = StepResult(step.name, "fail" if bad else "pass", 0.0, step.budget, len(comps),
                             worst.describe() if worst else None, [c.describe() for c in bad])
        except Exception as exc:  # noqa: BLE001 - reported, and the run goes on
            res = StepResult(step.name, "error", 0.0, step.budget,
                             error="".join(traceback.format_exception_only(type(exc), exc)).strip(),
                             failures=[traceback.format_exc()])
        res.seconds = time.perf_counter() - t0
        results.append(res)
        if ctx.progress is not None:
            ctx.progress.end(step.budget)
            over = " (over budget)" if res.seconds > step.budget else ""
            ctx.progress.say(f"    {res.status} in {res.seconds:.1f} s{over}; {res.compared} compared"
                             + (f"; {len(res.failures)} failed" if res.failures else "")
                             + (f"; {res.error}" if res.error and res.status == "error" else ""))
        if step.fatal and res.status != "pass":
            stop = step.name
    return results


def format_tables(results: list[StepResult], report: dict) -> str:
    lines = [f"{'check':<18} {'status':<8} {'s':>7} {'budget':>7} {'compared':>8}  worst / error"]
    for r in results:
        note = r.error if r.status in ("error", "skipped") else (r.worst or "")
        lines.append(f"{r.name:<18} {r.status:<8} {r.seconds:>7.1f} {r.budget:>7.0f} {r.compared:>8}  {note[:90]}")
    perf = report.get("performance") or []
    if perf:
        lines += ["", (f"{'preset':<8} {'task':<7} {'model':<11} {'batch':>5} {'img/s':>10} {'x ref':>6} "
                       f"{'peak MB':>8} {'TFLOP/s':>8} {'% peak':>7}")]
        for r in perf:
            mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
            lines.append(f"{r['preset']:<8} {r['task']:<7} {r['model']:<11} {r['batch']:>5} "
                         f"{r['images_per_s']:>10.1f} {r['speedup'] or 0:>6.2f} {mem:>8} "
                         f"{r['tflops']:>8.3f} {r['pct_of_peak']:>7.2f}")
        lines.append(f"% peak: of {perf[0]['peak_tflops']:.1f} TFLOP/s fp32 ({perf[0]['peak_source']})")
    bw = report.get("bandwidth")
    if bw:
        lines += ["", f"copy {bw['copy_gb_per_s']:.0f} GB/s, fp32 matmul {bw['matmul_fp32_tflops']:.1f} TFLOP/s",
                  f"{'kernel':<18} {'shape':<28} {'ms':>8} {'GB/s':>8} {'% copy':>7}"]
        for r in bw["kernels"]:
            lines.append(f"{r['op']:<18} {r['shape'][:28]:<28} {r['ms']:>8.3f} {r['gb_per_s']:>8.1f} "
                         f"{r['pct_of_copy']:>7.1f}")
    return "\n".join(lines)


def run(ctx: Context, json_path: str | None, argv=None, stream=None, steps: list[Step] | None = None) -> int:
    """Run ``steps`` (default: the plan for ``ctx``), write the report, print the tables;
    returns the exit status."""
    stream = stream or sys.stdout
    steps = plan(ctx.presets) if steps is None else steps
    budget = sum(s.budget for s in steps)
    ctx.progress = ctx.progress or Progress(budget)
    started = time.perf_counter()
    with _no_tf32(), _more_recompiles():
        results = run_steps(steps, ctx)
    ok = all(r.status in ("pass", "skipped") for r in results) and any(r.status == "pass" for r in results)
    report = dict(ctx.report)
    report.update(
        command=" ".join(["python -m dvpvae.gpucheck", *(argv or [])]).strip(),
        timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        python=platform.python_version(), precision="float32, TF32 off",
        presets=list(ctx.presets), budget_s=budget, elapsed_s=time.perf_counter() - started, ok=ok,
        checks=[dataclasses.asdict(r) for r in results])
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, default=str)
    print(format_tables(results, report), file=stream)
    print(f"{'OK' if ok else 'FAILED'}: {sum(r.status == 'pass' for r in results)}/{len(results)} checks passed "
          f"in {_mmss(report['elapsed_s'])}" + (f"; report {json_path}" if json_path else ""), file=stream)
    return 0 if ok else 1


@contextlib.contextmanager
def _more_recompiles():
    # Two presets and their train/eval passes share the compiled methods' code objects.
    import torch._dynamo

    cfg = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(cfg, n)]
    saved = {n: getattr(cfg, n) for n in names}
    for n in names:
        setattr(cfg, n, max(saved[n], 64))
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(cfg, n, v)


def print_plan(presets, stream=None) -> None:
    stream = stream or sys.stdout
    steps = plan(presets)
    print(f"{'#':>2} {'check':<18} {'budget s':>8}  what", file=stream)
    for i, s in enumerate(steps, 1):
        print(f"{i:>2} {s.name:<18} {s.budget:>8.0f}  {s.what}", file=stream)
    print(f"total budget {sum(s.budget for s in steps):.0f} s ({_mmss(sum(s.budget for s in steps))}) "
          "on one H100/H200-class GPU", file=stream)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dvpvae.gpucheck", description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="list the checks and their budgets, run nothing")
    ap.add_argument("--json", default="gpucheck.json", metavar="PATH", help="the report (default: %(default)s)")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--device", default="cuda", help="a CUDA device (default: %(default)s)")
    args = ap.parse_args(argv)
    presets = tuple(p for p in args.presets.split(",") if p)
    unknown = [p for p in presets if p not in SIZES]
    if unknown:
        ap.error(f"unknown presets {unknown}; choose from {sorted(SIZES)}")
    if args.dry_run:
        print_plan(presets)
        return 0
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        print(f"dvpvae.gpucheck needs a CUDA GPU: torch {torch.__version__} ({build}) sees none. Install "
              "the CUDA build of torch on a machine with an NVIDIA GPU; --dry-run lists the checks.",
              file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("note: TRITON_INTERPRET=1 makes Triton interpret the kernels; the environment check "
              "fails. Unset it.", file=sys.stderr)
    return run(Context(device=device, presets=presets), args.json, argv=sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
