"""Benchmark: sampling N pseudoinputs from the diffusion prior through its T steps.

Providers:
  reference  the Python loop over DiffusionPrior.step (dvpvae.sampling.sample_prior_ref)
  extension  the T-step loop in C++ as sample_prior(backend="extension") runs it: the
             native UNet forward (torch.ops.dvpvae.ddpm_sample_unet) where supported, else
             the AOTInductor package
  aoti       (with --aoti) the loop over the AOTInductor package of the UNet
             (torch.ops.dvpvae.ddpm_sample), for comparison

Usage:
  python benchmarks/sampling.py [--preset mnist] [--n 1 16 256] [--aoti] [--json PATH]

The JSON holds ``results`` (one object per preset/n/backend with ``seconds_median``,
``seconds_min``, ``seconds_max``, ``gflops``), ``speedup`` keyed by n (reference median /
extension median), the extension's form ("native" or "aoti"), the machine (threads, CPU,
torch version) and, when a package is used, its one-time compile cost. Providers are timed in alternation (reference, extension, reference, ...)
so that both see the same machine load. Weights are random (the zero-initialised output
conv is perturbed so eps_hat != 0); speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:  # appended: the repository's packages keep precedence
    sys.path.append(BENCH)

from _harness import (add_run_options, cpu_name, matmul_peak_gflops, start_extension_run,  # noqa: E402
                      timeit_interleaved)
from dvpvae import get_config  # noqa: E402
from dvpvae.diffusion import DiffusionPrior  # noqa: E402
from dvpvae.noise import Noise  # noqa: E402
from dvpvae.sampling import (compile_package, native_supported, package_path, sample_prior,  # noqa: E402
                             sample_prior_aoti, sample_prior_ref)


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
    ap.add_argument("--aoti", action="store_true", help="also time the AOTInductor form of the loop")
    add_run_options(ap)
    args = ap.parse_args(argv)

    if start_extension_run(args):
        return 2
    prior = make_prior(args.preset)
    form = "native" if native_supported(prior) else "aoti"
    package = None
    if form == "aoti" or args.aoti:
        cached = os.path.exists(package_path(prior))
        t0 = time.perf_counter()
        path = compile_package(prior)
        package = {"path": path, "cached": cached, "compile_seconds": time.perf_counter() - t0}
    peak = matmul_peak_gflops()
    print(f"preset={args.preset} T={prior.T} shape={tuple(prior.shape)} threads={torch.get_num_threads()} "
          f"cpu={cpu_name()!r} torch={torch.__version__}")
    print(f"extension: {form} UNet forward; fp32 GEMM peak ~{peak:.0f} GFLOP/s")
    if package:
        print(f"package {package['path']} ({'cached' if package['cached'] else 'compiled'} in "
              f"{package['compile_seconds']:.1f} s)")

    results, speedup = [], {}
    for n in args.n:
        gen = torch.Generator().manual_seed(n)
        draws = {"prior_zT": torch.randn(n, *prior.shape, generator=gen),
                 "prior_eps": torch.randn(prior.T, n, *prior.shape, generator=gen)}
        providers = {
            "reference": lambda: sample_prior_ref(prior, n, args.temperature, Noise(draws)),
            "extension": lambda: sample_prior(prior, n, args.temperature, Noise(draws), backend="extension"),
        }
        if args.aoti:
            providers["aoti"] = lambda: sample_prior_aoti(prior, n, args.temperature, Noise(draws))
        ref = providers["reference"]()
        diffs = {name: (ref - fn()).abs().max().item() for name, fn in providers.items() if name != "reference"}
        repeats = args.repeats or (20 if n <= 16 else 5)
        flops = unet_flops(prior, n) * prior.T
        medians = {}
        all_times = timeit_interleaved(providers, repeats, args.warmup)
        for backend, times in all_times.items():
            med = statistics.median(times)
            medians[backend] = med
            results.append({"preset": args.preset, "n": n, "backend": backend, "seconds_median": med,
                            "seconds_min": min(times), "seconds_max": max(times), "repeats": repeats,
                            "gflops": flops / med / 1e9, "max_abs_diff_vs_reference": diffs.get(backend, 0.0),
                            "speedup": medians["reference"] / med})
        speedup[str(n)] = medians["reference"] / medians["extension"]

    print(f"\n{'n':>5} {'backend':>10} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'GFLOP/s':>8} {'speedup':>8}")
    for r in results:
        sp = f"{r['speedup']:.2f}x" if r["backend"] != "reference" else ""
        print(f"{r['n']:>5} {r['backend']:>10} {r['seconds_median'] * 1e3:>10.2f} {r['seconds_min'] * 1e3:>9.2f} "
              f"{r['seconds_max'] * 1e3:>9.2f} {r['gflops']:>8.2f} {sp:>8}")
    for backend in [b for b in ("extension", "aoti") if any(r["backend"] == b for r in results)]:
        print(f"max |{backend} - reference|: " + ", ".join(
            f"n={r['n']}: {r['max_abs_diff_vs_reference']:.1e}" for r in results if r["backend"] == backend))

    if args.json:
        out = {
            "benchmark": "sampling", "preset": args.preset, "T": prior.T,
            "temperature": args.temperature, "extension_form": form, "results": results, "speedup": speedup,
            "machine": {"device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "gemm_peak_gflops": peak},
            "package": package,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
