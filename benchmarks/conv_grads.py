"""Benchmark: weight and bias gradients of the CPU fast path's convolutions.

Providers, for each kernel size (1x1, 3x3 with padding 1) and resolution of a preset's
ResNet blocks (channels-last float32, the shapes of the training step):
  onednn     aten.convolution_backward asked for the weight gradient, plus ATen's channel sum
             (``conv_weight_grad(..., use_extension=False)``)
  extension  torch.ops.dvpvae.conv_weight_grad (csrc/conv_wgrad_cpu.cpp), both at once
             (``conv_weight_grad(..., use_extension=True)``; the channel counts must be ones
             its kernel covers, ``dvpvae.cpu_conv.extension_covers``)

Usage:
  python benchmarks/conv_grads.py [--preset mnist] [--batch 250] [--sizes 28 14 7] [--repeats 9]
                                  [--threads N] [--json PATH]

Providers are timed in alternation so that both see the same machine load. The table shows
median and min ms, GFLOP/s of the weight gradient (2 N H W Co Ci k^2), the speed-up of the
medians and each provider's largest error relative to a float64 computation. The report goes
to ``benchmarks/results/conv_grads.json`` (``--json PATH`` elsewhere) and
``benchmarks/RESULTS.md`` is regenerated from it (``_harness.save_report``).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)

from _harness import add_run_options, save_report, start_extension_run, timeit_interleaved  # noqa: E402
from dvpvae import get_config  # noqa: E402
from dvpvae.cpu_conv import conv_weight_grad, extension_covers  # noqa: E402

PROVIDERS = {"onednn": False, "extension": True}  # name -> use_extension
TABLE_COLUMNS = [("kernel_size", "k"), ("size", "size"), ("batch", "batch"), ("channels", "channels"),
                 ("provider", "provider"), ("ms_median", "median ms"), ("ms_min", "min ms"),
                 ("ms_max", "max ms"), ("gflops", "GFLOP/s"), ("speedup_vs_onednn", "x onednn"),
                 ("max_rel_error_vs_float64", "rel. error")]


def _relative_error(got, want) -> float:
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def bench_shape(n: int, channels: int, size: int, k: int, repeats: int, warmup: int) -> list[dict]:
    """Both providers on one (batch, channels, size, kernel size) case."""
    gen = torch.Generator().manual_seed(size * 10 + k)
    x = torch.randn(n, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(channels, channels, k, k)
    providers = {name: (lambda ext=ext: conv_weight_grad(grad, x, weight, ext)) for name, ext in PROVIDERS.items()}
    exact = conv_weight_grad(grad.double(), x.double(), weight.double(), False)
    errors = {name: _relative_error(fn(), exact) for name, fn in providers.items()}
    times = timeit_interleaved(providers, repeats, warmup)
    flops = 2 * n * size * size * channels * channels * k * k
    base = statistics.median(times["onednn"])
    return [{"provider": name, "batch": n, "channels": channels, "size": size, "kernel_size": k,
             "ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t), "ms_max": 1e3 * max(t),
             "gflops": flops / statistics.median(t) / 1e9, "speedup_vs_onednn": base / statistics.median(t),
             "max_rel_error_vs_float64": errors[name]} for name, t in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=0, help="0: the preset's training batch size")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="resolutions (default: the image size, 1/2 and 1/4 of it)")
    ap.add_argument("--repeats", type=int, default=9)
    add_run_options(ap)
    args = ap.parse_args(argv)

    if start_extension_run(args):
        return 2
    cfg = get_config(args.preset)
    batch = args.batch or cfg.batch_size
    channels = int(cfg.num_ch * cfg.block_ch_mult)
    sizes = args.sizes or [cfg.image_size, cfg.image_size // 2, cfg.image_size // 4]
    probe = torch.empty(1, channels, 1, 1)
    if not extension_covers(probe, probe):
        print(f"the extension's kernel does not cover {channels} channels on this CPU (it needs "
              "out channels % 4 == 0, in channels % 8 == 0 and AVX2 or AVX-512)", file=sys.stderr)
        return 2
    print(f"preset={args.preset} batch={batch} channels={channels} threads={torch.get_num_threads()} "
          f"cpu capability={torch.backends.cpu.get_cpu_capability()} torch={torch.__version__}")
    results = []
    for k in (3, 1):
        for size in sizes:
            results += bench_shape(batch, channels, size, k, args.repeats, args.warmup)

    print(f"\n{'k':>2} {'size':>5} {'provider':>10} {'median ms':>10} {'min ms':>8} {'GFLOP/s':>8} "
          f"{'speed-up':>9} {'rel err':>8}")
    for r in results:
        print(f"{r['kernel_size']:>2} {r['size']:>5} {r['provider']:>10} {r['ms_median']:>10.2f} {r['ms_min']:>8.2f} "
              f"{r['gflops']:>8.1f} {r['speedup_vs_onednn']:>8.2f}x {r['max_rel_error_vs_float64']:>8.1e}")
    save_report("conv_grads", {"preset": args.preset, "results": results}, args.json, argv,
                TABLE_COLUMNS, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
