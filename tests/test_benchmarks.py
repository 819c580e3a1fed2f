"""The benchmark scripts at tiny sizes: complete reports, sane numbers, RESULTS.md regenerated.

No timing comparisons: the machine is shared and the sizes are tiny. This checks that the
README's first command keeps working, that every (provider, task) row is measured, and that
the JSON and RESULTS.md carry the command and the machine.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
TASKS = ("train", "eval", "nll", "sample")


def _load_benchmark(name: str):
    if BENCH not in sys.path:  # appended: benchmarks/kernels.py must not shadow anything
        sys.path.append(BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def throughput():
    return _load_benchmark("throughput")


@pytest.fixture(scope="module")
def harness():
    if BENCH not in sys.path:
        sys.path.append(BENCH)
    import _harness

    return _harness


TINY = ["--preset", "tiny", "--batch", "2", "--repeats", "1", "--warmup", "1", "--k", "2",
        "--nll-batch", "2", "--sample-n", "2", "--peak-sizes", "128,256"]


def _positive_finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _check_report(rep, models, flops=True):
    for key in ("device", "threads", "torch", "triton", "timestamp", "results", "matmul_peak_gflops"):
        assert key in rep, key
    assert rep["threads"] == torch.get_num_threads()
    if flops:
        # The measured peak is the best of the sizes' rates (JSON keys are strings).
        rates = {int(n): g for n, g in rep["matmul_rates"].items()}
        assert sorted(rates) == [128, 256] and all(_positive_finite(g) for g in rates.values())
        assert rep["matmul_peak_gflops"] == max(rates.values()) == rates[rep["matmul_peak_n"]]
        assert rep["flops"]["train"] > rep["flops"]["eval"] > 0  # backward adds work
        assert all(rep["flops"][t] > 0 for t in TASKS)
    rows = [(r["model"], r["task"]) for r in rep["results"]]
    assert sorted(rows) == sorted((m, t) for m in models for t in TASKS)  # each exactly once
    base = {r["task"]: r for r in rep["results"] if r["model"] == "DVPVAE"}
    for r in rep["results"]:
        assert "error" not in r, r
        assert r["preset"] == "tiny"
        assert r["batch"] == {"train": 2, "eval": 2, "nll": 2, "sample": 2}[r["task"]]
        for key in ("images_per_s", "it_per_s", "seconds_median", "seconds_min", "seconds_max",
                    "warmup_s", "first_call_s", "speedup_vs_DVPVAE") + (("gflops",) if flops else ()):
            assert _positive_finite(r[key]), (key, r)
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["seconds_median"])
        assert r["it_per_s"] == pytest.approx(1 / r["seconds_median"])
        assert r["seconds_min"] <= r["seconds_median"] <= r["seconds_max"]
        assert r["first_call_s"] == pytest.approx(r["warmup_s"]) and r["warmup_calls"] == 1
        assert r["repeats"] == 1 and r["inner"] >= 1
        assert r["first_call_cache"] in ("none", "bypass", "miss", "hit")
        if r["model"] == "DVPVAE":
            assert r["first_call_cache"] == "none"
        # The ratios are those of this run's own timings against the reference's.
        b = base[r["task"]]
        assert r["speedup_vs_DVPVAE"] == pytest.approx(b["seconds_median"] / r["seconds_median"])
        assert r["speedup_vs_DVPVAE_of_min"] == pytest.approx(b["seconds_min"] / r["seconds_min"])
        if flops:
            # One count per task (the reference's work), the rate from each provider's median.
            assert r["flops"] == rep["flops"][r["task"]]
            assert r["gflops"] == pytest.approx(r["flops"] / r["seconds_median"] / 1e9)
            peak = rep["matmul_peak_bf16_gflops"] if r["model"] == "FastDVPVAE-bf16" else rep["matmul_peak_gflops"]
            assert r["fraction_of_peak"] == pytest.approx(r["gflops"] / peak)
        # RSS can even drop during a call (a page returned to the OS), so only >= -slack.
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] > -64
        if r["model"] == "DVPVAE":
            assert r["speedup_vs_DVPVAE"] == pytest.approx(1.0)


def _check_results_md(md_path, report, harness):
    text = open(md_path).read()
    run = report["run"]
    assert f"## {report['benchmark']}" in text
    assert run["command"] in text
    assert f"Machine: {harness.machine_line(run)}" in text
    assert harness.cpu_name() in text and harness.cpu_isa() in text
    assert f"{torch.get_num_threads()} threads" in text and f"torch {torch.__version__}" in text
    assert run["timestamp"][:10] in text
    return text


def test_help_runs_as_a_script():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "throughput.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for option in ("--preset", "--batch", "--nll-batch", "--k", "--sample-n", "--fast-flag", "--official",
                   "--json"):
        assert option in out.stdout


def test_reference_only_writes_json_and_results_md(throughput, harness, tmp_path):
    out = tmp_path / "results" / "throughput.json"
    argv = TINY + ["--providers", "DVPVAE", "--json", str(out)]
    assert throughput.main(argv) == 0
    rep = json.loads(out.read_text())
    _check_report(rep, ["DVPVAE"])
    assert rep["benchmark"] == "throughput"
    assert rep["run"]["command"] == "python benchmarks/throughput.py " + " ".join(argv)
    text = _check_results_md(tmp_path / "results" / "RESULTS.md", rep, harness)
    table = [line for line in text.splitlines() if line.startswith("| DVPVAE |")]
    assert [line.split(" | ")[1] for line in table] == list(TASKS)
    assert not (tmp_path / "RESULTS.md").exists()


def test_fast_without_compile(throughput):
    # compile=off: the providers' code paths without minutes of torch.compile warm-up.
    rep = throughput.run(throughput.parse_args(TINY + ["--providers", "DVPVAE,FastDVPVAE", "--no-flops",
                                                       "--fast-flag", "compile=off"]))
    _check_report(rep, ["DVPVAE", "FastDVPVAE"], flops=False)
    assert "FastDVPVAE flags: compile=False" in rep["notes"]
    assert {r["first_call_cache"] for r in rep["results"]} == {"none"}


def test_one_fast_model_per_precision_in_the_same_run(throughput):
    rep = throughput.run(throughput.parse_args(TINY + ["--providers", "DVPVAE,FastDVPVAE", "--fast-flag",
                                                       "compile=off", "--precision", "float32,bf16"]))
    _check_report(rep, ["DVPVAE", "FastDVPVAE", "FastDVPVAE-bf16"])
    assert rep["config"]["precisions"] == ["float32", "bf16"]
    bf16_rates = {int(n): g for n, g in rep["matmul_rates_bf16"].items()}
    assert sorted(bf16_rates) == [128, 256] and rep["matmul_peak_bf16_gflops"] == max(bf16_rates.values())
    by_model = {r["model"]: r for r in rep["results"] if r["task"] == "train"}
    assert "fraction_of_fma_peak" not in by_model["FastDVPVAE-bf16"]  # the FMA peak is float32's


@pytest.mark.parametrize("text", ["fp16", "bf16,bf16", ""])
def test_bad_precision_list_is_refused(throughput, text, capsys):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--precision", text])
    assert "precision" in capsys.readouterr().err


def test_flops_are_counted_with_the_reference_provider(throughput):
    # FlopCounterMode cannot see the CPU provider's C++ ops (prior sampler, convolutions):
    # a model computing with them must be counted as the reference computes.
    from dvpvae import DVPVAE, get_config
    from dvpvae.ops import CpuOps

    args = throughput.parse_args(TINY)
    cfg = get_config("tiny")
    x = throughput.make_images(cfg, 2)
    data = {"train": x, "eval": x, "nll": x}
    ref, cpu = DVPVAE(cfg).eval(), DVPVAE(cfg, ops="cpu").eval()
    tasks = ("train", "sample")  # the custom convolutions with their gradients; the C++ sampler
    counts = {t: throughput.task_flops(ref, cfg, t, data, args) for t in tasks}
    assert all(counts[t] > 0 for t in tasks)
    assert {t: throughput.task_flops(cpu, cfg, t, data, args) for t in tasks} == counts
    assert isinstance(cpu.ops, CpuOps)  # the model's own provider is back
    # The sample count holds the prior's T UNet passes (one more pass per step adds FLOPs).
    longer = DVPVAE(cfg, diffusion_steps=cfg.diffusion_steps + 1).eval()
    assert throughput.task_flops(longer, cfg, "sample", data, args) > counts["sample"]


def test_bad_peak_sizes_are_an_error(throughput, capsys):
    for text in ("0", "512,x", "", "256,-1"):
        with pytest.raises(SystemExit):
            throughput.parse_args(["--peak-sizes", text])
        assert "expected a comma list of positive sizes" in capsys.readouterr().err
    assert throughput.parse_args(["--peak-sizes", "64,128"]).peak_sizes == (64, 128)


def test_unknown_fast_flag_is_an_error(throughput):
    for item in ("jit=off", "compile=maybe"):
        with pytest.raises(SystemExit, match="--fast-flag expects"):
            throughput.parse_fast_flags([item])
    assert throughput.parse_fast_flags(["extension=off", "cuda_graphs=on"]) == {"extension": False,
                                                                                "cuda_graphs": True}


def test_official_missing_path_is_a_note(throughput, tmp_path):
    args = throughput.parse_args(TINY + ["--providers", "DVPVAE,official", "--official", str(tmp_path),
                                         "--tasks", "sample", "--no-flops"])
    rep = throughput.run(args)
    assert [r["model"] for r in rep["results"]] == ["DVPVAE"]
    assert any(n.startswith("official skipped") for n in rep["notes"])


def test_results_md_gathers_every_report(harness, tmp_path):
    rows = [{"provider": "a", "ms": 1.5, "speedup": 1.0}, {"provider": "b", "ms": 0.25, "error": "E|x"}]
    harness.save_report("zeta", {"results": rows}, str(tmp_path / "zeta.json"), ["--n", "3"])
    harness.save_report("alpha", {"rows": rows}, str(tmp_path / "alpha.json"), [],
                        columns=[("provider", "who"), ("ms", "time ms")])
    (tmp_path / "other.json").write_text("[1, 2]")  # not a report: skipped
    (tmp_path / "broken.json").write_text("{")
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.index("## alpha") < text.index("## zeta")
    assert "python benchmarks/zeta.py --n 3" in text
    assert "| who | time ms | error |" in text  # error column added for failed rows
    assert "| provider | ms | speedup | error |" in text
    assert "E\\|x" in text  # a | inside a cell is escaped
    assert text.count("Machine: ") == 2
    # Regeneration is a pure function of the reports.
    before = text
    assert harness.write_results_md(str(tmp_path)) == str(tmp_path / "RESULTS.md")
    assert (tmp_path / "RESULTS.md").read_text() == before


def test_default_report_path(harness, monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(harness, "RESULTS_MD", str(tmp_path / "RESULTS.md"))
    path = harness.save_report("demo", {"results": [{"x": 1}]}, None, [])
    assert path == str(tmp_path / "results" / "demo.json")
    assert "## demo" in (tmp_path / "RESULTS.md").read_text()


def test_cpu_isa_names_the_vector_extension(harness):
    isa = harness.cpu_isa()
    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX512":
        assert isa.startswith("AVX-512")
    elif cap == "AVX2":
        assert isa.startswith(("AVX2", "AVX-512"))


def test_peak_memory_sees_an_allocation(harness):
    if harness.rss_bytes() is None:
        pytest.skip("no /proc/self/statm")
    with harness.PeakMemory("cpu") as m:
        t = torch.ones(16, 2 ** 20)  # 64 MiB, written so its pages are resident
        time.sleep(0.05)  # longer than the sampling interval: the probe must see it
        del t
    assert m.mb > 32


def test_heartbeat_speaks_while_a_long_block_runs_and_not_after(harness):
    said, first = [], threading.Event()

    def say(seconds):
        said.append(seconds)
        first.set()

    with harness.Heartbeat(say, every=0.01):
        assert first.wait(10.0), "no heartbeat while the block ran"
    count = len(said)
    time.sleep(0.05)
    assert len(said) == count and all(s > 0 for s in said)  # silent once the block has ended
    with harness.Heartbeat(say, every=60.0):
        pass  # a block shorter than the interval says nothing
    assert len(said) == count


def test_compile_cache_tells_miss_hit_bypass_and_none(harness, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 8)

    def plain(t):
        return (t.sin() * 2).sum()

    def with_autocast_region(t):
        with torch.autocast("cpu", enabled=False):
            return (t.cos() * 3).sum()

    def outcome(fn):
        torch._dynamo.reset()  # a new process's view: only the on-disk caches are warm
        with harness.CompileCache() as cache:
            fn(x)
        return cache.outcome

    try:
        assert outcome(plain) == "none"  # nothing compiled
        assert outcome(torch.compile(plain)) == "miss"  # an empty cache
        assert outcome(torch.compile(plain)) == "hit"
        assert outcome(torch.compile(with_autocast_region)) == "bypass"  # AOTAutograd refuses the region
    finally:
        torch._dynamo.reset()


def test_convs_reports_every_pass_of_both_providers_with_small_errors(harness, tmp_path, capsys):
    from dvpvae import _ext

    if not _ext.available():
        pytest.skip("needs the built C++ extension")
    path = tmp_path / "convs.json"
    argv = ["--preset", "tiny", "--batch", "2", "--sizes", "5", "3", "--repeats", "1", "--warmup", "0",
            "--json", str(path)]
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        # The rules give every pass to oneDNN here, so there is nothing to compare: a clear exit.
        assert _load_benchmark("convs").main(argv) == 2
        assert "oneDNN serves every pass" in capsys.readouterr().err and not path.exists()
        return
    assert _load_benchmark("convs").main(argv) == 0
    rep = json.loads(path.read_text())
    assert rep["run"]["threads"] == torch.get_num_threads()
    cases = [(r["pass"], r["provider"], r["kernel_size"], r["size"]) for r in rep["results"]]
    passes = [("forward", 3), ("input_grad", 3), ("weight_grad", 3), ("weight_grad", 1)]
    assert sorted(cases) == sorted((name, p, k, s) for name, k in passes for p in ("onednn", "extension")
                                   for s in (5, 3))
    for r in rep["results"]:
        assert r["channels"] == 16 and r["batch"] == 2
        for key in ("ms_median", "ms_min", "ms_max", "gflops", "speedup_vs_onednn"):
            assert _positive_finite(r[key]), (key, r)
        assert r["max_rel_error_vs_float64"] < 1e-5
    _check_results_md(tmp_path / "RESULTS.md", rep, harness)


# ------------------------------------------------------------------ convergence.py
@pytest.fixture(scope="module")
def convergence():
    return _load_benchmark("convergence")


def test_convergence_writes_curves_plot_and_time_to_quality(convergence, harness, tmp_path):
    import numpy as np

    from datafiles import images
    from official_checkout import write_checkout

    data = tmp_path / "d.npz"
    np.savez(data, x=images(40), x_test=images(8, seed=3))
    out = tmp_path / "results" / "convergence.json"
    # official: the miniature research checkout, which trains in a fraction of tiny's time.
    argv = ["--preset", "tiny", "--data", "npz", "--data-root", str(data), "--steps", "2", "--eval-every", "1e-9",
            "--eval-images", "8", "--k", "2", "--providers", "DVPVAE,official",
            "--official", write_checkout(tmp_path / "dvp_vae"), "--batch-size", "8", "--json", str(out)]
    assert convergence.main(argv) == 0
    rep = json.loads(out.read_text())
    for key in ("config", "notes", "curves", "time_to_quality", "results", "png", "run"):
        assert key in rep, key
    assert rep["config"]["config_overrides"] == {"batch_size": 8}
    for prov, curve in rep["curves"].items():
        # At 0, after every step (eval-every below any step's time) and no point twice.
        assert [p["step"] for p in curve] == [0, 1, 2], prov
        assert curve[0]["seconds"] == 0 and all(a["seconds"] < b["seconds"] for a, b in zip(curve, curve[1:]))
        for p in curve:
            for key in ("nelbo_raw", "nelbo_ema", "nll_raw", "nll_ema"):
                assert math.isfinite(p[key]), (prov, p)
        assert curve[0]["nelbo_raw"] == curve[0]["nelbo_ema"]  # the EMA starts at the weights
    for w in ("raw", "ema"):
        t = rep["time_to_quality"][w]
        bests = {p: min(q[f"nelbo_{w}"] for q in c) for p, c in rep["curves"].items()}
        assert t["target_nelbo"] == max(bests.values())
        secs = t["seconds"]
        for p, c in rep["curves"].items():
            assert 0 < secs[p] <= c[-1]["seconds"]
        assert t["speedup_vs"]["DVPVAE"]["official"] == pytest.approx(secs["DVPVAE"] / secs["official"])
        assert t["speedup_vs"]["official"]["official"] == pytest.approx(1.0)
    rows = {r["provider"]: r for r in rep["results"]}
    assert set(rows) == {"DVPVAE", "official"}
    for p, r in rows.items():
        assert r["steps"] == 2 and r["s_per_step"] == pytest.approx(r["train_s"] / 2)
        assert r["s_per_later_step"] == pytest.approx(r["train_s"] - r["first_step_s"])
        assert r["seconds_to_target_raw"] == rep["time_to_quality"]["raw"]["seconds"][p]
        assert r["speedup_vs_DVPVAE_ema"] == rep["time_to_quality"]["ema"]["speedup_vs"]["DVPVAE"][p]
    png = tmp_path / "results" / "convergence.png"
    assert rep["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = _check_results_md(tmp_path / "results" / "RESULTS.md", rep, harness)
    assert "| DVPVAE | 2 |" in text and "| official | 2 |" in text


def test_time_to_quality_interpolates_to_the_common_target(convergence):
    a = [dict(seconds=0.0, nelbo_raw=30.0), dict(seconds=2.0, nelbo_raw=20.0), dict(seconds=4.0, nelbo_raw=10.0)]
    b = [dict(seconds=0.0, nelbo_raw=30.0), dict(seconds=1.0, nelbo_raw=float("nan")),
         dict(seconds=6.0, nelbo_raw=15.0), dict(seconds=8.0, nelbo_raw=16.0)]
    for c in (a, b):
        for p in c:
            p["nelbo_ema"] = p["nelbo_raw"]
    t = convergence.time_to_quality({"A": a, "B": b})["raw"]
    assert t["target_nelbo"] == 15.0  # B's best; A goes further
    assert t["seconds"] == {"A": pytest.approx(3.0), "B": 6.0}  # A: halfway from 20 (2 s) to 10 (4 s)
    assert t["speedup_vs"]["B"] == {"A": pytest.approx(2.0), "B": pytest.approx(1.0)}
    assert convergence.seconds_to(a, "nelbo_raw", 5.0) is None


def test_convergence_arguments_are_checked(convergence, capsys):
    for argv, msg in ((["--providers", "DVPVAE"], "give a budget"),
                      (["--steps", "3"], "needs --eval-every"),
                      (["--seconds", "10", "--providers", "official"], "needs --official"),
                      (["--seconds", "10", "--providers", "DVPVAE,jax"], "choose from"),
                      (["--seconds", "-1"], "must be positive")):
        with pytest.raises(SystemExit):
            convergence.parse_args(argv)
        assert msg in capsys.readouterr().err


def test_convergence_trains_one_fast_model_per_precision(convergence):
    args = convergence.parse_args(["--seconds", "1", "--providers", "DVPVAE,FastDVPVAE",
                                   "--precision", "float32,bf16"])
    assert args.providers == ["DVPVAE", "FastDVPVAE", "FastDVPVAE-bf16"]
    assert convergence.cli_model("FastDVPVAE-bf16") == ["--model", "fast", "--precision", "bf16"]
    assert convergence.cli_model("FastDVPVAE") == ["--model", "fast", "--precision", "float32"]
    assert convergence.cli_model("DVPVAE") == ["--model", "reference"]


def test_fma_peak_is_cores_times_clock_times_lanes_times_two(harness, monkeypatch):
    monkeypatch.setattr(harness, "cpu_isa", lambda: "AVX2")
    monkeypatch.setattr(harness, "cpu_max_mhz", lambda: (2500.0, "test clock"))
    monkeypatch.setattr(harness, "physical_cores", lambda: 4)
    peak = harness.fma_peak(threads=2)  # two threads use two of the four cores
    assert peak["gflops"] == pytest.approx(2 * 2.5 * 16 * 2) and peak["fma_lanes"] == 16
    assert "test clock" in peak["assumption"]
    monkeypatch.setattr(harness, "cpu_isa", lambda: "AVX-512 + AMX")
    assert harness.fma_peak(threads=8)["gflops"] == pytest.approx(4 * 2.5 * 32 * 2)
    monkeypatch.setattr(harness, "cpu_max_mhz", lambda: (None, "unknown"))
    assert harness.fma_peak(threads=2) is None
