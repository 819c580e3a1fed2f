"""Benchmark every op in ``dvpvae.kernels`` against its plain-PyTorch reference.

    python benchmarks/kernels.py [--json out.json] [--repeats 5] [--threads N] [--ops a,b]

Providers per op: ``reference`` (``<op>_ref``, the baseline) and ``triton`` (``<op>``,
timed on CUDA only: on CPU Triton runs in its interpreter, a correctness tool).

Each measurement: warm-up calls, then ``repeats`` timings of ``inner`` calls each; the table
shows the median with min/max per call. Forward ("fwd") and forward+backward ("fwd+bwd",
backward of ``randn_like`` output gradients) are timed separately. On CUDA the table also
shows effective GB/s (bytes the op must read and write at least once, divided by the median
time) against the measured device-to-device copy bandwidth of the GPU.

The default CPU run uses modest batch sizes; ``--full`` uses the presets' training/test
batch sizes.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform

import torch

from dvpvae.kernels import triton_runs_on
from dvpvae.kernels.conv1x1_act import conv1x1_act, conv1x1_act_ref
from dvpvae.kernels.conv1x1_residual import conv1x1_residual, conv1x1_residual_ref
from dvpvae.kernels.dct_pseudoinput import (dct_pseudoinput, dct_pseudoinput_ref,
                                            idct_pseudoinput, idct_pseudoinput_ref)
from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step, ddpm_step_ref
from dvpvae.kernels.reparam_kl import (reparam_kl, reparam_kl_ref, reparam_sample,
                                       reparam_sample_ref)

import _paths  # noqa: E402,F401  (this checkout's dvpvae first)
from _harness import measure, save_report, triton_version  # noqa: E402


# ------------------------------------------------------------------ bandwidth
def copy_bandwidth(device):
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes)."""
    n = 64 * 1024 * 1024  # 256 MB of fp32
    a = torch.empty(n, device=device)
    b = torch.empty_like(a)
    med, _, _, _ = measure(lambda: b.copy_(a), device, warmup=3, repeats=10, inner=5)
    return 2 * a.numel() * a.element_size() / med / 1e9


# ------------------------------------------------------------------ cases
def _nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def build_cases(device, dtype, full):
    """(op, shape label, providers {name: callable(*args)}, make_args, bytes_fwd) per case."""
    cases = []
    big = full or device.type == "cuda"

    def add(op, label, providers, make, bytes_fwd):
        cases.append(dict(op=op, label=label, providers=providers, make=make, bytes_fwd=bytes_fwd))

    for shape in ([(128, 3, 32, 32), (250, 1, 14, 14)] if big else [(32, 3, 32, 32), (64, 1, 14, 14)]):
        def make(shape=shape):
            return [torch.randn(shape, device=device, dtype=dtype) for _ in range(5)] + [-10.0]
        add("reparam_kl", "x".join(map(str, shape)),
            {"reference": reparam_kl_ref, "triton": reparam_kl},
            make, lambda a: _nbytes(*a[:5]) + _nbytes(a[0]))  # 5 reads, z written
    shape = (512, 3, 32, 32) if big else (64, 3, 32, 32)

    def make_s(shape=shape):
        return [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)] + [-10.0, 0.8]
    add("reparam_sample", "x".join(map(str, shape)),
        {"reference": reparam_sample_ref, "triton": reparam_sample},
        make_s, lambda a: _nbytes(*a[:3]) + _nbytes(a[0]))

    for shape, sched in ((((500, 1, 7, 7) if big else (250, 1, 7, 7)), (25, -6.0, 7.0)),
                         (((512, 3, 7, 7) if big else (128, 3, 7, 7)), (25, -10.0, 7.0))):
        def make_d(shape=shape, sched=sched):
            coef = ddpm_coefficients(*sched, dtype=dtype, device=device)
            return [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)] + [
                coef, torch.tensor(12, device=device), 1.0]
        add("ddpm_step", "x".join(map(str, shape)),
            {"reference": ddpm_step_ref, "triton": ddpm_step}, make_d,
            lambda a: _nbytes(*a[:3]) + _nbytes(a[0]))

    for n, c, hw, k in (((250 if big else 64), 1, 28, 7), ((128 if big else 32), 3, 32, 7)):
        def make_f(n=n, c=c, hw=hw, k=k):
            x = torch.rand(n, c, hw, hw, device=device, dtype=dtype) * 2 - 1
            return [x, torch.rand(c, k, k, device=device, dtype=dtype) * 10 + 1, k]

        def make_i(n=n, c=c, hw=hw, k=k):
            u = torch.rand(n, c, k, k, device=device, dtype=dtype) * 2 - 1
            return [u, torch.rand(c, k, k, device=device, dtype=dtype) * 10 + 1, (hw, hw)]
        add("dct_pseudoinput", f"{n}x{c}x{hw}x{hw}->{k}",
            {"reference": dct_pseudoinput_ref, "triton": dct_pseudoinput},
            make_f, lambda a: _nbytes(a[0]) * (1 + (a[2] / a[0].shape[-1]) ** 2))
        add("idct_pseudoinput", f"{n}x{c}x{k}x{k}->{hw}",
            {"reference": idct_pseudoinput_ref, "triton": idct_pseudoinput},
            make_i, lambda a: _nbytes(a[0]) * (1 + (a[2][0] / a[0].shape[-1]) ** 2))

    # cifar10 encoder block: 128 -> 96 channels (block_ch_mult 0.75) at 32x32
    n = 128 if big else 8
    cin, cout, hw = 128, 96, 32

    def make_c(n=n):
        return [torch.randn(n, cin, hw, hw, device=device, dtype=dtype),
                torch.randn(cout, cin, 1, 1, device=device, dtype=dtype) * cin ** -0.5,
                torch.randn(cout, device=device, dtype=dtype), "silu"]

    def make_r(n=n):
        return [torch.randn(n, cout, hw, hw, device=device, dtype=dtype),
                torch.randn(cin, cout, 1, 1, device=device, dtype=dtype) * cout ** -0.5,
                torch.randn(cin, device=device, dtype=dtype),
                torch.randn(n, cin, hw, hw, device=device, dtype=dtype), 1.0]
    add("conv1x1_act", f"{n}x{cin}x{hw}x{hw}->{cout}",
        {"reference": conv1x1_act_ref, "triton": conv1x1_act},
        make_c, lambda a: _nbytes(a[0], a[1], a[2]) + a[0].numel() // cin * cout * a[0].element_size())
    add("conv1x1_residual", f"{n}x{cout}x{hw}x{hw}->{cin}",
        {"reference": conv1x1_residual_ref, "triton": conv1x1_residual},
        make_r, lambda a: _nbytes(a[0], a[1], a[2], a[3]) * 1 + _nbytes(a[3]))
    return cases


# ------------------------------------------------------------------ driver
def _grad_leaves(args):
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().requires_grad_(True)
        out.append(a)
    return out


def _fwd_bwd(fn, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.grad(outs, leaves, grads, allow_unused=True)


def run(args):
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = build_cases(device, dtype, args.full)
    notes = []
    if args.ops:
        wanted = set(args.ops.split(","))
        cases = [c for c in cases if c["op"] in wanted]
    timed_triton = (device.type == "cuda" and triton_runs_on(device)
                    and os.environ.get("TRITON_INTERPRET", "0") != "1")
    if device.type == "cpu":
        notes.append("Triton on CPU is the interpreter (a correctness tool); it is not "
                     "benchmarked for speed.")
    elif not timed_triton:
        notes.append(f"Triton cannot run compiled kernels on {device}; only the references "
                     "are timed.")
    bw = copy_bandwidth(device) if device.type == "cuda" else None
    rows = []
    for case in cases:
        base = case["make"]()
        for mode in ("fwd", "fwd+bwd"):
            for prov, fn in case["providers"].items():
                if prov == "triton" and not timed_triton:
                    continue
                call_args = _grad_leaves(base) if mode == "fwd+bwd" else base
                if mode == "fwd":
                    def call(fn=fn, a=call_args):
                        with torch.no_grad():
                            fn(*a)
                else:
                    def call(fn=fn, a=call_args):
                        _fwd_bwd(fn, a)
                try:
                    med, lo, hi, inner = measure(call, device, repeats=args.repeats)
                except Exception as e:  # keep benchmarking the other providers
                    rows.append(dict(op=case["op"], shape=case["label"], mode=mode, provider=prov,
                                     error=f"{type(e).__name__}: {e}"))
                    continue
                row = dict(op=case["op"], shape=case["label"], mode=mode, provider=prov,
                           median_ms=med * 1e3, min_ms=lo * 1e3, max_ms=hi * 1e3, inner=inner)
                if mode == "fwd" and device.type == "cuda":
                    gbs = case["bytes_fwd"](base) / med / 1e9
                    row.update(gb_per_s=gbs, pct_of_copy_bw=100 * gbs / bw)
                rows.append(row)
    # speed-up of each provider relative to the reference of the same (op, shape, mode)
    ref = {(r["op"], r["shape"], r["mode"]): r["median_ms"] for r in rows
           if r["provider"] == "reference" and "median_ms" in r}
    for r in rows:
        if "median_ms" in r and (r["op"], r["shape"], r["mode"]) in ref:
            r["speedup_vs_ref"] = ref[(r["op"], r["shape"], r["mode"])] / r["median_ms"]
    meta = dict(device=str(device), device_name=(torch.cuda.get_device_name(device)
                                                 if device.type == "cuda" else platform.processor()
                                                 or platform.machine()),
                dtype=args.dtype, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                triton=triton_version(), python=platform.python_version(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                repeats=args.repeats, full=args.full, copy_bandwidth_gb_per_s=bw, notes=notes)
    return meta, rows


def print_table(meta, rows):
    print(f"device {meta['device']} ({meta['device_name']}), dtype {meta['dtype']}, "
          f"torch {meta['torch']} with {meta['torch_threads']} threads, triton {meta['triton']}")
    if meta["copy_bandwidth_gb_per_s"]:
        print(f"measured copy bandwidth: {meta['copy_bandwidth_gb_per_s']:.0f} GB/s")
    for n in meta["notes"]:
        print(f"note: {n}")
    head = f"{'op':<18} {'shape':<22} {'mode':<8} {'provider':<10} {'median ms':>10} {'min':>9} {'max':>9} {'x ref':>6}"
    if meta["copy_bandwidth_gb_per_s"]:
        head += f" {'GB/s':>7} {'%bw':>5}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['op']:<18} {r['shape']:<22} {r['mode']:<8} {r['provider']:<10} ERROR {r['error'][:60]}")
            continue
        line = (f"{r['op']:<18} {r['shape']:<22} {r['mode']:<8} {r['provider']:<10} "
                f"{r['median_ms']:>10.3f} {r['min_ms']:>9.3f} {r['max_ms']:>9.3f} "
                f"{r.get('speedup_vs_ref', float('nan')):>6.2f}")
        if "gb_per_s" in r:
            line += f" {r['gb_per_s']:>7.1f} {r['pct_of_copy_bw']:>5.1f}"
        print(line)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp64", "bf16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--ops", default="", help="comma-separated subset of ops")
    p.add_argument("--full", action="store_true", help="preset batch sizes on CPU too")
    p.add_argument("--json", default="", help="write the results to this JSON file")
    args = p.parse_args(argv)
    meta, rows = run(args)
    print_table(meta, rows)
    save_report("kernels", dict(meta=meta, rows=rows), args.json or None, argv, device=meta["device"])


if __name__ == "__main__":
    main()
