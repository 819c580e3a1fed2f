"""python -m dvpvae.gpucheck on a machine without a GPU (exit 2, --dry-run), the pieces of its
check logic that run on CPU (comparisons, draw tape, model and kernel parity, timing, the
step runner and report), and best_ops' fallback on GPUs the kernels cannot run on."""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import dvpvae.kernels
from dvpvae import FastDVPVAE, Noise, cuda_graphs, gpucheck
from dvpvae.gpucheck import Comparison, Context, Step, Tape, close, three_way
from dvpvae.kernels import triton_runs_on
from dvpvae.ops import REFERENCE, TritonOps, best_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_interpreter = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="needs triton with TRITON_INTERPRET=1 set before it is imported")


def run_module(*args):
    return subprocess.run([sys.executable, "-m", "dvpvae.gpucheck", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------ command line
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    res = run_module("--json", str(tmp_path / "r.json"))
    assert res.returncode == 2, res.stderr
    assert "needs a CUDA GPU" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "r.json").exists()


def test_dry_run_lists_every_check_with_its_budget():
    res = run_module("--dry-run")
    assert res.returncode == 0, res.stderr
    steps = gpucheck.plan()
    for s in steps:
        assert s.name in res.stdout
    names = [s.name for s in steps]
    for p in gpucheck.DEFAULT_PRESETS:
        assert {f"parity-{p}", f"graphs-{p}", f"timing-{p}"} <= set(names)
    assert {"environment", "kernels", "prior-loop", "bandwidth"} <= set(names)
    total = sum(s.budget for s in steps)
    assert total <= gpucheck.TOTAL_BUDGET_S == 480
    assert f"total budget {total:.0f} s" in res.stdout


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpucheck.main(["--presets", "mnist,imagenet", "--dry-run"])
    assert e.value.code == 2
    assert "imagenet" in capsys.readouterr().err


# ------------------------------------------------------------------ comparisons
def test_three_way_passes_within_the_factor_and_fails_beyond():
    exact = torch.linspace(-1, 1, 50, dtype=torch.float64)
    ref = (exact + 1e-6).float()
    assert three_way("ok", (exact + 5e-6).float(), ref, exact, 8.0, 0.0).ok
    bad = three_way("bad", (exact + 1e-4).float(), ref, exact, 8.0, 0.0)
    assert not bad.ok and "bad: error" in bad.describe()
    nan = (exact + 0).float()
    nan[3] = math.nan
    assert not three_way("nan", nan, ref, exact, 8.0, 1.0).ok
    assert not three_way("shape", ref[:-1], ref, exact, 8.0, 1.0).ok
    outlier = (exact + 1e-6).float()
    outlier[7] += 0.5  # one sample of 50: beyond the max check, inside the 90% quantile
    assert not three_way("max", outlier, ref, exact, 8.0, 1e-6).ok
    assert three_way("quantile", outlier, ref, exact, 8.0, 1e-6, quantile=0.9).ok


def test_close_and_ratio():
    a = torch.tensor([1.0, 2.0])
    assert close("same", a, a, 0.0, 0.0).ok
    c = close("off", a + 1e-3, a, 1e-4, 0.0)
    assert not c.ok and c.ratio == pytest.approx(1e-3 / 2e-4, rel=1e-3)
    assert Comparison("x", 0.0, 0.0).ratio == 0.0 and Comparison("x", 1.0, 0.0).ratio == math.inf


def test_tape_replays_the_draws_in_order_cast_to_the_callers_dtype():
    tape = Tape(generator=torch.Generator().manual_seed(0))
    like = torch.zeros(1)
    a = tape.normal("binarize", (2, 3), like)
    b = tape.uniform("binarize", (4,), like, 0.5, 1.0)  # the same name twice, other shapes
    assert bool(((b >= 0.5) & (b < 1.0)).all())
    again = tape.replay()
    a64 = again.normal("binarize", (2, 3), like.double())
    assert a64.dtype == torch.float64 and torch.equal(a64.float(), a)
    assert torch.equal(again.uniform("binarize", (4,), like), b)
    with pytest.raises(ValueError, match="beyond the end"):
        again.normal("z0", (1,), like)
    with pytest.raises(ValueError, match="does not match"):
        tape.replay().normal("other", (2, 3), like)


# ------------------------------------------------------------------ model parity on CPU
@pytest.fixture(scope="module")
def tiny():
    ref, x = gpucheck.perturbed_model("tiny", seed=1, n_images=4)
    return ref, FastDVPVAE.from_reference(ref, compile=False), x


@pytest.mark.parametrize("training", [True, False])
def test_forward_parity_passes_for_the_fast_model(tiny, training):
    ref, fast, x = tiny
    comps = gpucheck.forward_parity(ref, fast, x, training)
    names = [c.name for c in comps]
    assert {"train loss" if training else "eval loss", "train kl" if training else "eval kl"} <= set(names)
    if training:
        _, g = gpucheck._forward(ref, x, Noise(generator=torch.Generator().manual_seed(0)), True)
        assert sum(n.startswith("grad ") for n in names) == len(g) > 100  # every gradient
    assert not gpucheck.failed(comps), [c.describe() for c in gpucheck.failed(comps)]


def test_forward_parity_fails_on_a_wrong_model(tiny):
    ref, _, x = tiny
    wrong = FastDVPVAE.from_reference(ref, share=False, compile=False)
    with torch.no_grad():
        wrong.decoder.pseudoinput.q_logvar.add_(1e-3)
    bad = gpucheck.failed(gpucheck.forward_parity(ref, wrong, x, True))
    assert any("loss" in c.name for c in bad) and any(c.name.startswith("grad ") for c in bad)


def test_nll_and_sample_parity(tiny):
    ref, fast, x = tiny
    comps, got, tape = gpucheck.nll_parity(ref, fast, x[:2], 3)
    assert not gpucheck.failed(comps) and got.shape == (2,)
    want = fast.estimate_nll(x[:2], 3, chunk_size=6, noise=tape.replay())
    assert torch.equal(got, want)  # the tape reproduces the pass
    comps = gpucheck.sample_parity(ref, fast, 3)
    assert [c.name for c in comps] == ["sample u", "sample images"] and not gpucheck.failed(comps)


# ------------------------------------------------------------------ kernels
@needs_interpreter
def test_kernel_checks_pass_in_the_interpreter():
    comps = gpucheck.check_kernels("cpu", small=True)
    ops = {c.name.split()[0] for c in comps}
    assert ops == {"reparam_kl", "reparam_sample", "ddpm_step", "dct_pseudoinput", "idct_pseudoinput",
                   "conv1x1_act", "conv1x1_residual"}
    assert any("float64" in c.name for c in comps) and any("grad" in c.name for c in comps)
    assert not gpucheck.failed(comps), [c.describe() for c in gpucheck.failed(comps)]


@needs_interpreter
def test_kernel_check_catches_a_wrong_kernel():
    case = next(c for c in gpucheck.kernel_cases(small=True) if c.op == "conv1x1_act")
    right = case.fn
    case.fn = lambda x, w, b, act: right(x, w * (1 + 1e-4), b, act)
    bad = gpucheck.failed(gpucheck.check_kernel_case(case, "cpu"))
    assert any("out0" in c.name for c in bad) and any("grad" in c.name for c in bad)


def test_full_kernel_cases_build_valid_inputs():
    cases = gpucheck.kernel_cases()
    assert len(cases) > len(gpucheck.kernel_cases(small=True))
    for case in cases:
        args, diff = case.make()
        assert all(isinstance(args[i], torch.Tensor) for i in diff)
        if case.op == "ddpm_step":  # the step row and the table agree
            assert 0 <= int(args[4]) < args[3].shape[0]
    bandwidth = gpucheck.kernel_cases(bandwidth=True)  # built, not made: millions of elements
    assert sorted(c.op for c in bandwidth) == sorted({c.op for c in cases})


# ------------------------------------------------------------------ timing, peaks, runner
def test_known_peaks_by_device_name():
    assert gpucheck.known_fp32_peak("NVIDIA H100 80GB HBM3") == 67.0
    assert gpucheck.known_fp32_peak("NVIDIA H100 PCIe") == 51.2
    assert gpucheck.known_fp32_peak("NVIDIA H200") == 67.0
    assert gpucheck.known_fp32_peak("NVIDIA A100-SXM4-80GB") == 19.5
    assert gpucheck.known_fp32_peak("NVIDIA L40S") == 91.6
    assert gpucheck.known_fp32_peak("NVIDIA L4") == 30.3
    assert gpucheck.known_fp32_peak("Some Future GPU") is None


def test_measure_counts_and_bounds_repeats():
    calls = []
    times = gpucheck.measure(lambda: calls.append(1), "cpu", warmup=2, min_repeats=3, max_repeats=5, max_seconds=0.0)
    assert len(times) == 3 and len(calls) == 5
    assert gpucheck.count_flops(lambda: torch.ones(4, 8) @ torch.ones(8, 3)) == 2 * 4 * 8 * 3
    assert gpucheck.peak_memory_mb(lambda: None, "cpu") is None


def test_environment_check_fails_when_kernels_would_be_interpreted(monkeypatch):
    ctx = Context(device=torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert gpucheck.failed(gpucheck.step_environment(ctx))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not gpucheck.failed(gpucheck.step_environment(ctx))
    assert ctx.report["environment"]["torch"] == torch.__version__


def test_runner_reports_failures_errors_and_stops_after_a_fatal_step(tmp_path, capsys):
    def boom(ctx):
        raise RuntimeError("kernel exploded")

    steps = [Step("good", 1, "", lambda ctx: [Comparison("a", 0.0, 1.0)]),
             Step("bad", 1, "", lambda ctx: [Comparison("b", 2.0, 1.0)]),
             Step("error", 1, "", boom),
             Step("gpu", 1, "", lambda ctx: [], cuda_only=True)]
    ctx = Context(device=torch.device("cpu"), progress=gpucheck.Progress(4, stream=sys.stdout))
    path = tmp_path / "report.json"
    assert gpucheck.run(ctx, str(path), steps=steps) == 1
    report = json.loads(path.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"good": "pass", "bad": "fail", "error": "error", "gpu": "skipped"}
    bad = next(c for c in report["checks"] if c["name"] == "bad")
    assert bad["failures"] == ["b: error 2, bound 1"]
    out = capsys.readouterr().out
    assert "[1/4] good" in out and "kernel exploded" in out and "FAILED: 1/4" in out

    fatal = [Step("first", 1, "", lambda ctx: [Comparison("x", 1.0, 0.0)], fatal=True), steps[0]]
    results = gpucheck.run_steps(fatal, Context(device=torch.device("cpu")))
    assert [r.status for r in results] == ["fail", "skipped"] and "after first" in results[1].error


@needs_interpreter
def test_the_plan_runs_on_cpu_for_the_tiny_preset(tmp_path, capsys):
    # Every step but the environment (which fails under the interpreter) with the real step
    # functions; the CUDA-only ones are skipped.
    ctx = Context(device=torch.device("cpu"), presets=("tiny",), compile=False, small_kernels=True,
                  timing_seconds=0.05, progress=gpucheck.Progress(100, stream=sys.stdout))
    steps = [s for s in gpucheck.plan(("tiny",)) if s.name != "environment"]
    path = tmp_path / "gpucheck.json"
    assert gpucheck.run(ctx, str(path), steps=steps) == 0
    report = json.loads(path.read_text())
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"kernels": "pass", "prior-loop": "pass", "parity-tiny": "pass", "graphs-tiny": "skipped",
                      "timing-tiny": "pass", "bandwidth": "skipped"}
    perf = report["performance"]
    assert {(r["model"], r["task"]) for r in perf} == {(m, t) for m in ("DVPVAE", "FastDVPVAE")
                                                       for t in ("train", "eval", "nll", "sample")}
    assert all(r["images_per_s"] > 0 and r["flops"] > 0 and r["pct_of_peak"] > 0 for r in perf)
    out = capsys.readouterr().out
    assert "img/s" in out and "OK: 4/6" in out


# ------------------------------------------------------------------ best_ops on unsupported GPUs
CUDA = torch.device("cuda")


def fallback(monkeypatch, capability=(9, 0), triton=True, probe=None):
    monkeypatch.setattr(dvpvae.kernels, "triton_runs_on", lambda device: triton)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    if probe is not None:
        monkeypatch.setattr(cuda_graphs, "_probe", probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = best_ops(CUDA)
    return ops, [str(w.message) for w in caught]


def test_best_ops_without_triton_falls_back_with_one_warning(monkeypatch):
    ops, msgs = fallback(monkeypatch, triton=False)
    assert ops is REFERENCE and len(msgs) == 1
    assert "triton package is not importable" in msgs[0] and "reference provider" in msgs[0]


@pytest.mark.parametrize("capability", [(6, 1), (7, 5)])
def test_best_ops_on_an_old_gpu_falls_back_with_one_warning(monkeypatch, capability):
    ops, msgs = fallback(monkeypatch, capability, probe=lambda d: pytest.fail("probed an unsupported GPU"))
    assert ops is REFERENCE and len(msgs) == 1
    assert f"compute capability {capability[0]}.{capability[1]}" in msgs[0]


def test_minimum_capability_follows_the_triton_version(monkeypatch):
    from dvpvae.kernels import _triton

    assert cuda_graphs.min_compute_capability() == (8, 0)  # the installed Triton 3.x
    monkeypatch.setattr(_triton.triton, "__version__", "3.2.0")
    assert cuda_graphs.min_compute_capability() == (7, 0)


def test_best_ops_falls_back_when_the_probe_launch_fails(monkeypatch):
    def broken(device):
        raise RuntimeError("ptxas fatal: unsupported target\nmore lines")

    ops, msgs = fallback(monkeypatch, (9, 0), probe=broken)
    assert ops is REFERENCE and len(msgs) == 1
    assert "probe launch" in msgs[0] and "RuntimeError: ptxas fatal: unsupported target" in msgs[0]
    assert "more lines" not in msgs[0]


def test_best_ops_probe_without_cuda_is_a_fallback_not_a_crash(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the probe would succeed on this machine")
    ops, msgs = fallback(monkeypatch, (9, 0))
    assert ops is REFERENCE and len(msgs) == 1 and "probe launch" in msgs[0]
    fast = FastDVPVAE("tiny", compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fast.ops_for(CUDA) is REFERENCE


def test_best_ops_uses_triton_on_a_supported_gpu(monkeypatch):
    ops, msgs = fallback(monkeypatch, (9, 0), probe=lambda d: None)
    assert isinstance(ops, TritonOps) and msgs == []
