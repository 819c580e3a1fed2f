"""Benchmark: the CPU fast path's convolutions, the extension's kernels against oneDNN.

For each pass, kernel size (1x1, 3x3 with padding 1) and resolution of a preset's ResNet
blocks (channels-last float32, the shapes of the training step), two providers:
  onednn     the pass from oneDNN (the extension's ops with tile 0 / extension False)
  extension  the pass as the cpu provider computes it (``dvpvae.cpu_conv``'s rules
             ``conv_tile`` and ``extension_covers``): Winograd for every 3x3 pass
             (F(4x4, 3x3) or F(2x2, 3x3), ``winograd_tile``; csrc/conv_winograd_cpu.cpp),
             the 1x1 weight and bias gradients at once (csrc/conv_wgrad_cpu.cpp), where the
             CPU and channel counts are ones they cover
Passes: forward and input_grad (3x3 only: the extension's ops compute a 1x1 convolution by
oneDNN; ``conv_cl``'s GEMM form on AVX-512 CPUs, ``pointwise_gemm``, is plain PyTorch and shows
in throughput.py's step) and weight_grad (weight and bias gradients).

Usage:
  python benchmarks/convs.py [--preset mnist] [--batch 250] [--sizes 28 14 7] [--repeats 9]
                             [--threads N] [--json PATH]

Providers are timed in alternation so that both see the same machine load. The table shows
median and min ms, GFLOP/s of the direct convolution's multiply-adds (2 N H W Co Ci k^2, so
Winograd's rate is an effective one), the speed-up of the medians and each provider's
largest error relative to a float64 computation. The report goes to
``benchmarks/results/convs.json`` (``--json PATH`` elsewhere) and ``benchmarks/RESULTS.md``
is regenerated from it (``_harness.save_report``).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)

from _harness import add_run_options, save_report, start_extension_run, timeit_interleaved  # noqa: E402
from dvpvae import get_config  # noqa: E402
from dvpvae.cpu_conv import conv_tile, extension_covers, winograd_covers  # noqa: E402

PROVIDERS = {"onednn": False, "extension": True}  # name -> whether the rules choose the kernels
PASSES = {3: ("forward", "input_grad", "weight_grad"), 1: ("weight_grad",)}
TABLE_COLUMNS = [("pass", "pass"), ("kernel_size", "k"), ("size", "size"), ("batch", "batch"),
                 ("channels", "channels"), ("provider", "provider"), ("ms_median", "median ms"),
                 ("ms_min", "min ms"), ("ms_max", "max ms"), ("gflops", "GFLOP/s"),
                 ("speedup_vs_onednn", "x onednn"), ("max_rel_error_vs_float64", "rel. error")]


def _relative_error(got, want) -> float:
    return max(((g.double() - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want))


def pass_fn(name: str, grad, x, weight, bias, use_rules: bool):
    """() -> the pass's tensors from the kernel the cpu provider's rules choose (``use_rules``),
    else from oneDNN."""
    ops = torch.ops.dvpvae
    tile = conv_tile(x, weight) if use_rules else 0
    if name == "forward":
        return lambda: (ops.conv_cl(x, weight, bias, tile),)
    if name == "input_grad":
        return lambda: ops.conv_cl_backward(grad, x, weight, tile, False, [True, False])[:1]
    extension = use_rules and extension_covers(grad, x, weight.shape[-1])
    return lambda: ops.conv_cl_backward(grad, x, weight, tile, extension, [False, True])[1:]


def bench_shape(n: int, channels: int, size: int, k: int, repeats: int, warmup: int) -> list[dict]:
    """Both providers on every pass of one (batch, channels, size, kernel size) case."""
    gen = torch.Generator().manual_seed(size * 10 + k)
    x = torch.randn(n, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(n, channels, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, channels, k, k, generator=gen) / (channels * k * k) ** 0.5
    bias = torch.randn(channels, generator=gen)
    flops = 2 * n * size * size * channels * channels * k * k
    rows = []
    with torch.no_grad():
        for name in PASSES[k]:
            providers = {p: pass_fn(name, grad, x, weight, bias, ext) for p, ext in PROVIDERS.items()}
            exact = pass_fn(name, grad.double(), x.double(), weight.double(), bias.double(), False)()
            errors = {p: _relative_error(fn(), exact) for p, fn in providers.items()}
            times = timeit_interleaved(providers, repeats, warmup)
            base = statistics.median(times["onednn"])
            rows += [{"pass": name, "provider": p, "batch": n, "channels": channels, "size": size,
                      "kernel_size": k, "ms_median": 1e3 * statistics.median(t), "ms_min": 1e3 * min(t),
                      "ms_max": 1e3 * max(t), "gflops": flops / statistics.median(t) / 1e9,
                      "speedup_vs_onednn": base / statistics.median(t), "max_rel_error_vs_float64": errors[p]}
                     for p, t in times.items()]
    return rows


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
    if not winograd_covers(torch.empty(1, channels, 1, 1), torch.empty(channels, channels, 3, 3)):
        print(f"the extension's kernels do not cover {channels} channels on this CPU (they need "
              "channels % 8 == 0 and an AVX2 or AVX-512 CPU), so oneDNN serves every pass", file=sys.stderr)
        return 2
    print(f"preset={args.preset} batch={batch} channels={channels} threads={torch.get_num_threads()} "
          f"cpu capability={torch.backends.cpu.get_cpu_capability()} torch={torch.__version__}")
    results = []
    for k in (3, 1):
        for size in sizes:
            results += bench_shape(batch, channels, size, k, args.repeats, args.warmup)

    print(f"\n{'pass':>11} {'k':>2} {'size':>5} {'provider':>10} {'median ms':>10} {'min ms':>8} "
          f"{'GFLOP/s':>8} {'speed-up':>9} {'rel err':>8}")
    for r in results:
        print(f"{r['pass']:>11} {r['kernel_size']:>2} {r['size']:>5} {r['provider']:>10} {r['ms_median']:>10.2f} "
              f"{r['ms_min']:>8.2f} {r['gflops']:>8.1f} {r['speedup_vs_onednn']:>8.2f}x "
              f"{r['max_rel_error_vs_float64']:>8.1e}")
    save_report("convs", {"preset": args.preset, "results": results}, args.json, argv,
                TABLE_COLUMNS, device="cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
