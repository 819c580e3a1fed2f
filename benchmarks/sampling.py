"""Benchmark: sampling N pseudoinputs from the diffusion prior through its T steps.

Providers:
  reference  the Python loop over DiffusionPrior.step (DiffusionPrior.sample with the
             reference ops)
  native     the whole loop in one call of the C++ op (dvpvae.native_prior.sample_native,
             torch.ops.dvpvae.ddpm_sample_unet)

Usage:
  python benchmarks/sampling.py [--preset mnist] [--n 1 16 256] [--threads 2] [--json PATH]

The noise is drawn once per n and both providers sample from it, timed in alternation
(reference, native, reference, ...) so that both see the same machine load. The JSON holds
``results`` (one object per preset/n/provider with ``seconds_median``, ``seconds_min``,
``seconds_max``, ``gflops``, the largest difference from the reference and the speedup),
``speedup`` keyed by n (reference median / native median) and the machine (threads, CPU,
torch version). Weights are random (the zero-initialised output conv is perturbed so
eps_hat != 0); speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)

from _harness import (add_run_options, cpu_name, matmul_rates, save_report,  # noqa: E402
                      start_extension_run, timeit_interleaved)
from dvpvae import Noise, get_config  # noqa: E402
from dvpvae.diffusion import DiffusionPrior  # noqa: E402
from dvpvae.native_prior import native_unsupported_reason, sample_native  # noqa: E402


def unet_flops(prior, n: int) -> int:
    """FLOPs of one UNet call at batch n (convs, matmuls; elementwise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    z = torch.zeros(n, *prior.shape)
    t = torch.full((n,), 0.5)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        prior.unet(z, t)
    return counter.get_total_flops()


def make_prior(preset: str) -> DiffusionPrior:
    torch.manual_seed(0)
    prior = DiffusionPrior.from_config(get_config(preset)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(prior.unet.out_conv.weight, std=0.05)
    return prior


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=0, help="0: chosen per n (more for small n)")
    add_run_options(ap)
    args = ap.parse_args(argv)

    if start_extension_run(args):
        return 2
    prior = make_prior(args.preset)
    reason = native_unsupported_reason(prior)
    if reason is not None:
        print(f"the native sampler does not serve this prior: {reason}", file=sys.stderr)
        return 2
    peak = max(matmul_rates().values())
    print(f"preset={args.preset} T={prior.T} shape={tuple(prior.shape)} threads={torch.get_num_threads()} "
          f"cpu={cpu_name()!r} torch={torch.__version__}; fp32 GEMM peak ~{peak:.0f} GFLOP/s")

    results, speedup = [], {}
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        z = torch.randn(n, *prior.shape, generator=gen)
        eps = torch.randn(prior.T, n, *prior.shape, generator=gen)
        providers = {
            "reference": lambda: prior.sample(n, args.temperature, noise=Noise({"prior_zT": z, "prior_eps": eps})),
            "native": lambda: sample_native(prior, z, eps, args.temperature),
        }
        ref = providers["reference"]()
        diff = (ref - providers["native"]()).abs().max().item()
        repeats = args.repeats or (20 if n <= 16 else 5)
        flops = unet_flops(prior, n) * prior.T
        times = timeit_interleaved(providers, repeats, args.warmup)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name, t in times.items():
            results.append({"preset": args.preset, "n": n, "backend": name, "seconds_median": medians[name],
                            "seconds_min": min(t), "seconds_max": max(t), "repeats": repeats,
                            "gflops": flops / medians[name] / 1e9,
                            "max_abs_diff_vs_reference": diff if name == "native" else 0.0,
                            "speedup": medians["reference"] / medians[name]})
        speedup[str(n)] = medians["reference"] / medians["native"]

    print(f"\n{'n':>5} {'backend':>10} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'GFLOP/s':>8} {'speedup':>8}")
    for r in results:
        sp = f"{r['speedup']:.2f}x" if r["backend"] != "reference" else ""
        print(f"{r['n']:>5} {r['backend']:>10} {r['seconds_median'] * 1e3:>10.2f} {r['seconds_min'] * 1e3:>9.2f} "
              f"{r['seconds_max'] * 1e3:>9.2f} {r['gflops']:>8.2f} {sp:>8}")
    print("max |native - reference|: " + ", ".join(
        f"n={r['n']}: {r['max_abs_diff_vs_reference']:.1e}" for r in results if r["backend"] == "native"))

    save_report("sampling", {"preset": args.preset, "T": prior.T, "temperature": args.temperature,
                             "results": results, "speedup": speedup, "gemm_peak_gflops": peak},
                args.json, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
