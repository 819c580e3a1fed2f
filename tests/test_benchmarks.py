"""benchmarks/throughput.py at a tiny size: the report has the documented schema and sane numbers.

No timing assertions: the machine is shared and the sizes are tiny. This checks that the
README's main command keeps working and that its JSON stays machine-readable.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load_benchmark(name: str):
    if BENCH not in sys.path:  # appended: benchmarks/kernels.py must not shadow the kernels package
        sys.path.append(BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def throughput():
    return _load_benchmark("throughput")


TINY = ["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "1", "--k", "2",
        "--nll-batch", "2", "--sample-n", "2", "--peak-n", "256"]


def _check_report(rep, models, flops=True):
    for key in ("device", "threads", "torch", "triton", "timestamp", "results", "matmul_peak_gflops"):
        assert key in rep, key
    assert rep["threads"] == torch.get_num_threads()
    if flops:
        assert rep["matmul_peak_gflops"] > 0
        assert rep["flops"]["train"] > rep["flops"]["eval"] > 0  # backward adds work
    got = {(r["model"], r["task"]) for r in rep["results"]}
    assert got == {(m, t) for m in models for t in ("train", "eval", "nll", "sample")}
    for r in rep["results"]:
        assert "error" not in r, r
        assert r["preset"] == "tiny" and r["batch"] == 2
        for key in ("images_per_s", "it_per_s", "seconds_median", "seconds_min", "seconds_max",
                    "warmup_s", "first_call_s") + (("gflops",) if flops else ()):
            assert r[key] > 0, (key, r)
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
        # RSS can even drop during a call (a page returned to the OS), so only >= -slack.
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > -64
        if r["model"] == "DVPVAE":
            assert r["speedup_vs_DVPVAE"] == pytest.approx(1.0)


def test_reference_only(throughput, tmp_path):
    out = tmp_path / "bench.json"
    rc = throughput.main(TINY + ["--providers", "DVPVAE", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    _check_report(rep, ["DVPVAE"])


def test_fast_without_compile(throughput):
    if throughput.FastDVPVAE is None:
        pytest.skip(f"FastDVPVAE not importable: {throughput.FAST_IMPORT_ERROR}")
    known = throughput.fast_flags_supported()
    if "compile" not in known:
        pytest.skip("FastDVPVAE has no compile flag; compiling would take minutes")
    # extension=off as well: its first use AOT-compiles the prior UNet (cached on disk,
    # but a fresh checkout would pay a minute here).
    flags = ["--fast-flag", "compile=off"] + (["--fast-flag", "extension=off"] if "extension" in known else [])
    # --no-flops: the reference test covers the counts; this one is about the second provider.
    rep = throughput.run(throughput.parse_args(TINY + ["--providers", "DVPVAE,FastDVPVAE", "--no-flops"]
                                               + flags))
    _check_report(rep, ["DVPVAE", "FastDVPVAE"], flops=False)
    assert all(r["speedup_vs_DVPVAE"] > 0 for r in rep["results"])
    assert any("compile=False" in n for n in rep["notes"])


def test_official_missing_path_is_a_note(throughput, tmp_path):
    args = throughput.parse_args(TINY + ["--providers", "DVPVAE,official", "--official", str(tmp_path),
                                         "--tasks", "sample", "--no-flops"])
    rep = throughput.run(args)
    assert [r["model"] for r in rep["results"]] == ["DVPVAE"]
    assert any(n.startswith("official skipped") for n in rep["notes"])


def test_peak_memory_sees_an_allocation():
    if BENCH not in sys.path:  # appended: benchmarks/kernels.py must not shadow the kernels package
        sys.path.append(BENCH)
    import _harness

    if _harness.rss_bytes() is None:
        pytest.skip("no /proc/self/statm")
    with _harness.PeakMemory("cpu") as m:
        t = torch.ones(16, 2 ** 20)  # 64 MiB, written so its pages are resident
        time.sleep(0.05)  # longer than the sampling interval: the probe must see it
        del t
    assert m.mb > 32


def test_conv_grads_reports_both_providers_with_small_errors(tmp_path):
    from dvpvae import _ext

    if not _ext.available() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("needs the built C++ extension on an AVX2 CPU")
    path = tmp_path / "conv.json"
    rc = _load_benchmark("conv_grads").main(["--preset", "tiny", "--batch", "2", "--sizes", "5", "3",
                                             "--repeats", "1", "--warmup", "0", "--json", str(path)])
    assert rc == 0
    rep = json.loads(path.read_text())
    assert rep["threads"] == torch.get_num_threads()
    cases = {(r["provider"], r["kernel_size"], r["size"]) for r in rep["results"]}
    assert cases == {(p, k, s) for p in ("onednn", "extension") for k in (1, 3) for s in (5, 3)}
    for r in rep["results"]:
        assert r["channels"] == 16 and r["ms_median"] > 0 and r["gflops"] > 0
        assert r["max_rel_error_vs_float64"] < 1e-5
