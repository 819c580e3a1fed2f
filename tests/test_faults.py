"""Faults a long run meets: SIGKILL at any moment, damaged files, a full disk, runaway
gradients, bad command lines. A process that must die runs as a subprocess; one
uninterrupted run (``reference``) is the yardstick every interrupted run must reproduce."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import datafiles
import dvpvae
from dvpvae import checkpoint as C
from dvpvae import evaluate as E
from dvpvae import train as T
from dvpvae.checkpoint import CheckpointError, CheckpointManager, load_training_checkpoint
from dvpvae.optim import GradNormGuard
from dvpvae.plotting import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16  # checkpoints at 4, 8 (with validation), 12, 16 (with validation)


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(npz, out, *extra):
    return datafiles.training_argv(npz, out, "--model", "reference", "--max-steps", str(STEPS), "--save-every", "4",
                                   "--eval-every", "8", "--grad-skip-factor", "10", *extra)


@pytest.fixture(scope="module")
def reference(tiny_npz, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert T.main(_args(tiny_npz, out)) == 0
    return out


def _ckdir(out):
    return os.path.join(out, "checkpoints")


def _steps(out):
    return [s for s, _ in CheckpointManager(_ckdir(out)).steps()]


def _stale(out):
    return [os.path.join(d, n) for d in (str(out), _ckdir(out)) if os.path.isdir(d)
            for n in os.listdir(d) if ".tmp-" in n]


def _assert_same_run(ref, out):
    """Per-step metrics, validation losses and the final weights, moments and EMA: identical."""
    a, b = datafiles.metric_rows(ref), datafiles.metric_rows(out)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "bpd", "grad_norm", "lr", "epoch", "skipped_nonfinite", "skipped_grad_norm"):
            assert ra[k] == rb[k], (ra["step"], k)
    assert [(r["step"], r["val_loss"]) for r in datafiles.metric_rows(ref, "val")] == \
        [(r["step"], r["val_loss"]) for r in datafiles.metric_rows(out, "val")]
    name = f"step-{STEPS:08d}"
    ca = load_training_checkpoint(os.path.join(_ckdir(ref), name))
    cb = load_training_checkpoint(os.path.join(_ckdir(out), name))
    for k in ca.model:
        assert torch.equal(ca.model[k], cb.model[k]) and torch.equal(ca.ema[k], cb.ema[k]), k
    for pid, st in ca.optimizer["state"].items():
        for k, v in st.items():
            assert torch.equal(v, cb.optimizer["state"][pid][k]), (pid, k)
    assert ca.state["skip_guard"] == cb.state["skip_guard"]


# ----------------------------------------------------------------------------- SIGKILL

def _spawn(tiny_npz, out, log, *extra, pause=None):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop(C._PAUSE_ENV, None)
    if pause:
        env[C._PAUSE_ENV] = pause
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "dvpvae.train", *_args(tiny_npz, out, *extra)],
                                env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f)


def _wait(proc, log, cond, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, f"exited with {proc.returncode}:\n{open(log).read()[-3000:]}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_sigkill_at_any_moment_resumes_the_same_run(tiny_npz, reference, tmp_path, capsys):
    out, log = tmp_path / "run", str(tmp_path / "log")
    marker = tmp_path / "paused"

    # 1. Two SIGTERMs while the first checkpoint is half written: the second stops at once,
    #    and the half-written folder goes with it.
    p = _spawn(tiny_npz, out, log, pause=f"checkpoint-write:4:{marker}")
    _wait(p, log, marker.exists)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)  # the first signal only requests a stop; the write is still paused
    p.send_signal(signal.SIGTERM)
    p.wait(60)
    err = open(log).read()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "stopped by a second signal" in err and "Traceback" not in err
    assert os.listdir(_ckdir(out)) == []

    # 2. SIGKILL inside the write of step 12: steps 4 and 8 are complete, 12 is a temporary.
    marker.unlink()
    p = _spawn(tiny_npz, out, log, "--resume", pause=f"checkpoint-write:12:{marker}")
    _wait(p, log, marker.exists)
    p.kill()
    p.wait(60)
    assert "starting a new run" in open(log).read()
    assert _steps(out) == [4, 8]
    assert [os.path.basename(s) for s in _stale(out)] == [f".tmp-step-00000012-{p.pid}"]

    # 3. SIGKILL between steps, after step 12 was saved.
    p = _spawn(tiny_npz, out, log, "--resume")
    _wait(p, log, lambda: any(r["step"] >= 13 for r in datafiles.metric_rows(out)))
    p.kill()
    p.wait(60)
    err = open(log).read()
    assert f"removed stale temporary {os.path.join(_ckdir(out), '.tmp-step-00000012-')}" in err
    assert "16 steps from step 8;" in err  # the newest complete checkpoint, not the temporary
    assert _steps(out) == [4, 8, 12]

    # 4. Resume to the end: the same run as the uninterrupted one.
    capsys.readouterr()
    assert T.main(_args(tiny_npz, out, "--resume")) == 0
    assert "16 steps from step 12;" in capsys.readouterr().err
    _assert_same_run(reference, out)
    assert _stale(out) == []


def test_clean_stale_restores_a_replaced_checkpoint_and_removes_the_rest(reference, tmp_path):
    ck = tmp_path / "checkpoints"
    shutil.copytree(_ckdir(reference), ck)
    # killed between the two renames of a re-save: the old copy is aside, its name is free
    os.rename(ck / "step-00000012", ck / ".tmp-replaced-step-00000012-77")
    os.makedirs(ck / ".tmp-step-00000020-77")  # a half-written checkpoint
    os.makedirs(ck / ".tmp-pruned-step-00000004-77")  # a half-deleted one
    (ck / "best.json.tmp-77").write_text("{")  # an atomic_write that never renamed
    msgs = C.clean_stale(str(ck))
    assert len(msgs) == 4 and sum(m.startswith("restored step-00000012 from") for m in msgs) == 1
    assert sorted(os.listdir(ck)) == ["best.json", "step-00000008", "step-00000012", "step-00000016"]
    load_training_checkpoint(str(ck / "step-00000012"))
    assert C.clean_stale(str(ck)) == []


# ----------------------------------------------------------------------------- damaged files

def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def _flip(path, at=-9):
    data = bytearray(open(path, "rb").read())
    data[at] ^= 0x04
    open(path, "wb").write(bytes(data))


def _flip_digit(path):
    text = open(path, "rb").read()
    _flip(path, text.index(b'"step": ') + len(b'"step": '))  # 1 -> 5: still valid JSON


def _other_preset(path):
    open(path, "wb").write(C.config_bytes(dvpvae.get_config("mnist")))


DAMAGE = {  # (file, damage): what the error must say besides the file name
    ("model.safetensors", _truncate): "corrupt or truncated",
    ("model.safetensors", _flip): "do not match the sha256",
    ("ema.safetensors", _truncate): "corrupt or truncated",
    ("ema.safetensors", _flip): "do not match the sha256",
    ("state.safetensors", _truncate): "corrupt or truncated",
    ("state.safetensors", _flip): "do not match the sha256",
    ("config.json", lambda p: open(p, "w").write("{\"num_ch\": ")): "",
    ("config.json", os.remove): "missing",
    ("config.json", _other_preset): "",
    ("state.json", lambda p: open(p, "w").write("[1, 2")): "",
    ("state.json", os.remove): "missing",
    ("state.json", _flip_digit): "sha256 differs",
}


@pytest.mark.parametrize("fname, damage", list(DAMAGE), ids=lambda v: getattr(v, "__name__", v))
def test_damaged_checkpoint_files_are_named(reference, tmp_path, fname, damage):
    ck = tmp_path / "step-00000016"
    shutil.copytree(os.path.join(_ckdir(reference), "step-00000016"), ck)
    damage(str(ck / fname))
    with pytest.raises(CheckpointError, match=f"{fname}.*{DAMAGE[fname, damage]}|"
                                              f"{DAMAGE[fname, damage]}.*{fname}"):
        load_training_checkpoint(str(ck))
    if fname in ("model.safetensors", "ema.safetensors", "config.json"):  # what evaluate reads
        with pytest.raises(CheckpointError, match=r"(config|model|ema)\.(json|safetensors)"):
            C.load_model(str(ck), use_ema=fname != "model.safetensors")


def test_damaged_exported_weights_are_named(reference, tmp_path):
    folder = tmp_path / "final"
    shutil.copytree(os.path.join(reference, "final"), folder)
    _flip(str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="corrupt safetensors file .*final/model.safetensors"):
        C.load_model(str(folder))
    with pytest.raises(CheckpointError, match="final/model.safetensors"):
        dvpvae.DVPVAE.from_pretrained(str(folder))


def test_resume_falls_back_to_the_newest_intact_checkpoint(tiny_npz, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for r in read_metrics(str(out / "metrics.jsonl")):
        assert r["step"] <= STEPS
    _flip(os.path.join(_ckdir(out), "step-00000016", "model.safetensors"))
    _truncate(os.path.join(_ckdir(out), "step-00000012", "state.json"))
    capsys.readouterr()
    assert T.main(_args(tiny_npz, out, "--resume")) == 0
    err = capsys.readouterr().err
    assert "passing over a damaged checkpoint: corrupt safetensors file" in err
    assert "step-00000016/model.safetensors" in err and "step-00000012/state.json" in err
    assert f"resuming from {os.path.join(_ckdir(out), 'step-00000008')}, the newest intact" in err
    _assert_same_run(reference, out)  # steps 9..16 again, over the damaged ones

    for name in ("step-00000008", "step-00000012", "step-00000016"):
        _truncate(os.path.join(_ckdir(out), name, "ema.safetensors"))
    with pytest.raises(SystemExit, match="no intact checkpoint in .* \\(3 damaged\\)"):
        T.main(_args(tiny_npz, out, "--resume"))


def _rewrite_state(ckpt, edit):
    """Edit state.json and record its new sha256, as a writer with other values would."""
    path = os.path.join(ckpt, "state.json")
    doc = json.load(open(path))
    edit(doc)
    data = C._json_bytes(doc)
    open(path, "wb").write(data)
    tensors, meta = C.load_tensors(os.path.join(ckpt, "state.safetensors"))
    digests = dict(json.loads(meta["json_sha256"]), **{"state.json": hashlib.sha256(data).hexdigest()})
    blob = C._tensor_bytes(tensors, {"json_sha256": json.dumps(digests)})  # before the file is truncated
    open(os.path.join(ckpt, "state.safetensors"), "wb").write(blob)


def test_review_findings(tiny_npz, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ck = os.path.join(_ckdir(out), "step-00000016")
    mgr = CheckpointManager(_ckdir(out))
    # best.json is followed only to a step folder of its own directory
    for bad in ({"checkpoint": "../../etc", "val_loss": 1.0}, {"checkpoint": ck, "val_loss": 1.0},
                {"checkpoint": "step-00000016"}, ["step-00000016"]):
        open(os.path.join(_ckdir(out), "best.json"), "w").write(json.dumps(bad))
        with pytest.raises(CheckpointError, match="best.json is malformed"):
            C.resolve(str(out))
    open(os.path.join(_ckdir(out), "best.json"), "w").write("{")
    with pytest.raises(CheckpointError, match="corrupt JSON in .*best.json"):
        mgr.best()
    with pytest.warns(UserWarning, match="best.json"):  # the next save replaces it
        mgr.save(20, dvpvae.DVPVAE.from_preset("tiny"), dvpvae.get_config("tiny"), val_loss=1.0)
    assert mgr.best().endswith("step-00000020")
    shutil.rmtree(os.path.join(_ckdir(out), "step-00000020"))
    os.remove(os.path.join(_ckdir(out), "best.json"))

    # a state without the torch RNG is a CheckpointError, not a KeyError
    broken = tmp_path / "no_rng"
    shutil.copytree(ck, broken)
    tensors, meta = C.load_tensors(str(broken / "state.safetensors"))
    del tensors["rng/torch"]
    blob = C._tensor_bytes(tensors, {"json_sha256": meta["json_sha256"]})
    open(broken / "state.safetensors", "wb").write(blob)
    with pytest.raises(CheckpointError, match="state.safetensors lacks the tensor 'rng/torch'"):
        load_training_checkpoint(str(broken))

    # the data position does not carry over to another world size or epoch length
    _rewrite_state(ck, lambda d: d.update(world_size=2))
    with pytest.raises(SystemExit, match="state.json: written by a run on 2 processes, this one has 1"):
        T.main(_args(tiny_npz, out, "--resume"))
    _rewrite_state(ck, lambda d: d.update(world_size=1))
    with pytest.raises(SystemExit, match="had 4 steps per epoch, .* give 3"):
        T.main(_args(tiny_npz, out, "--resume", "--val-fraction", "0.3"))
    with pytest.raises(SystemExit, match="--preset mnist, but .* was trained with preset tiny"):
        T.main(_args(tiny_npz, out, "--resume", "--preset", "mnist"))
    # a longer schedule is allowed, with a warning
    with pytest.warns(UserWarning, match="changed learning-rate schedule.*'total_steps': \\(16, 18\\)"):
        assert T.main(_args(tiny_npz, out, "--resume", "--max-steps", "18", "--eval-every", "100")) == 0
    assert datafiles.metric_rows(out)[-1]["step"] == 18


# ----------------------------------------------------------------------------- full disk

def test_full_disk_keeps_the_last_checkpoint_and_training_going(tiny_npz, reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("step-00000012", "step-00000016"):
        shutil.rmtree(os.path.join(_ckdir(out), name))
    shutil.rmtree(out / "final")
    kept = os.path.join(_ckdir(out), "step-00000008")
    before = {f: open(os.path.join(kept, f), "rb").read() for f in os.listdir(kept)}
    limit = 200_000  # above every log, plot and JSON file; below a weights file

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop(C._PAUSE_ENV, None)
    p = subprocess.run([sys.executable, "-m", "dvpvae.train", *_args(tiny_npz, out, "--resume")], env=env,
                       cwd=ROOT, preexec_fn=small_files, capture_output=True, timeout=240)
    err = p.stderr.decode()
    assert p.returncode == 1, err
    assert "Traceback" not in err
    for step in (12, 16):
        assert f"error: writing checkpoint step {step} (the newest on disk: {kept}) failed " \
               "([Errno 27] File too large)" in err
    assert "exporting the final weights failed" in err
    # the previous checkpoint is untouched, nothing half-written is left, training went on
    assert {f: open(os.path.join(kept, f), "rb").read() for f in os.listdir(kept)} == before
    assert _steps(out) == [8] and _stale(out) == [] and not (out / "final").exists()
    assert [r["loss"] for r in datafiles.metric_rows(out)] == [r["loss"] for r in datafiles.metric_rows(reference)]


# ----------------------------------------------------------------------------- runaway gradients

class _Poison(torch.nn.Module):
    """Wraps the trainer's model and multiplies the loss of chosen steps by a factor."""

    def __init__(self, trainer, at):
        super().__init__()
        self.trainer, self.inner, self.at = [trainer], trainer.model, at

    def forward(self, x):
        out = self.inner(x)
        if self.trainer[0].step in self.at:
            out.loss = out.loss * self.at[self.trainer[0].step]
        return out


def _trainer(tiny_npz, out, *extra):
    return T.Trainer(T.build_parser().parse_args(_args(tiny_npz, out, "--save-every", "100",
                                                       "--eval-every", "100", *extra)))


def _snapshot(t):
    return ([p.detach().clone() for p in t.model.parameters()],
            [p.detach().clone() for p in t.ema.module.parameters()],
            [v.clone() for st in t.optimizer.state.values() for v in st.values()])


def _same(a, b):
    return all(len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)) for x, y in zip(a, b))


def test_skipped_steps_change_nothing_and_are_counted(tiny_npz, tmp_path, monkeypatch):
    poison = {3: float("nan"), 4: float("inf"), 12: 1e6, 13: 1e6}  # 0-based step -> loss factor
    tr = _trainer(tiny_npz, tmp_path / "r")
    tr.ddp = _Poison(tr, poison)
    snaps = [_snapshot(tr)]
    tr.step_hook = lambda t: snaps.append(_snapshot(t))
    # the step decides on the device: no host read of any tensor
    step = tr.train_step

    def no_sync_step(x):
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync in train_step"))
            m.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("host sync in train_step"))
            return step(x)

    tr.train_step = no_sync_step
    assert tr.run() is None
    for s in range(STEPS):
        assert _same(snaps[s], snaps[s + 1]) == (s in poison), s
    rows = datafiles.metric_rows(tmp_path / "r")
    assert [r["skipped_nonfinite"] for r in rows] == [0] * 3 + [1] + [2] * 12
    assert [r["skipped_grad_norm"] for r in rows] == [0] * 12 + [1] + [2] * 3
    assert tr.guard.count.item() == STEPS - 2  # every finite norm fed the running mean


@pytest.mark.parametrize("cause", ["nonfinite", "threshold"])
def test_a_run_of_skips_stops_with_a_message(tiny_npz, tmp_path, capsys, cause):
    extra = ["--max-consecutive-skips", "3"] + (["--grad-skip-thr", "1e-9"] if cause == "threshold" else [])
    tr = _trainer(tiny_npz, tmp_path / "r", *extra)
    if cause == "nonfinite":
        tr.ddp = _Poison(tr, {s: float("nan") for s in range(2, STEPS)})
    assert tr.run() == T.STOP_SKIPS
    stopped = 5 if cause == "nonfinite" else 3
    assert datafiles.metric_rows(tmp_path / "r")[-1]["step"] == stopped
    assert f"stopping at step {stopped} without a checkpoint: 3 consecutive steps were skipped" in \
        capsys.readouterr().err
    assert _steps(tmp_path / "r") == []


def test_grad_norm_guard_rejects_spikes_and_follows_a_lasting_rise():
    g = GradNormGuard(torch.device("cpu"), factor=10.0, warmup=5)
    applied = [bool(g(torch.tensor(v), torch.tensor(1.0))) for v in [2.0] * 6 + [1e6, float("nan")]]
    assert applied == [True] * 6 + [False, False]
    assert g.take_max_streak() == 2 and g.streak.item() == 2
    assert 2.0 < g.mean.item() < 2.0 * (1 + 9 / 100) + 1e-6  # a spike moves the mean by <= 9%
    applied = [bool(g(torch.tensor(100.0), torch.tensor(1.0))) for _ in range(60)]
    first = applied.index(True)
    assert 0 < first < 50 and all(applied[first:])  # a 50x level shift is skipped, then followed
    h = GradNormGuard(torch.device("cpu"), factor=10.0, warmup=5)
    h.load_state_dict(json.loads(json.dumps(g.state_dict())))
    assert h.state_dict() == g.state_dict()
    for bad in ({"factor": 0.5}, {"factor": -1.0}, {"threshold": -1.0}):
        with pytest.raises(ValueError, match="invalid skip settings"):
            GradNormGuard(torch.device("cpu"), **bad)


# ----------------------------------------------------------------------------- bad command lines

@pytest.mark.parametrize("extra, message", [
    (["--log-every", "0"], "--log-every must be positive, got 0"),
    (["--num-samples", "0"], "--num-samples must be positive, got 0"),
    (["--batch-size", "0"], "batch_size must be positive, got 0"),
    (["--num-ch", "-8"], "num_ch must be positive, got -8"),
    (["--max-steps", "-1"], "--max-steps must be positive"),
    (["--keep", "0"], "--keep must be positive"),
    (["--grad-skip-factor", "0.5"], "grad_skip_factor must be 0 \\(off\\) or > 1"),
    (["--data-root", "/no/such/file.npz"], "--data-root /no/such/file.npz does not exist"),
    (["--resume", "EMPTY"], "is neither a run folder .* nor a checkpoint folder"),
    (["--resume", "FOREIGN"], "is neither a run folder .* nor a checkpoint folder"),
    (["--resume", "/no/such/run"], "--resume /no/such/run: no such run or checkpoint folder"),
])
def test_bad_train_arguments_fail_in_one_line_before_any_work(tiny_npz, tmp_path, extra, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FOREIGN").mkdir()
    (tmp_path / "FOREIGN" / "notes.txt").write_text("not a run")
    extra = [str(tmp_path / e) if e in ("EMPTY", "FOREIGN") else e for e in extra]
    with pytest.raises(SystemExit, match=message) as info:
        T.main(_args(tiny_npz, tmp_path / "run", *extra))
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert info.value.code.startswith("dvpvae-train: error: ")
    assert not (tmp_path / "run").exists()


def test_unknown_preset_is_one_line(tiny_npz, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        T.main(_args(tiny_npz, tmp_path / "run", "--preset", "huge"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'huge'" in err


def test_bad_data_files_are_named(tmp_path):
    bad = tmp_path / "float.npz"
    np.savez(bad, x=np.zeros((40, 28, 28), np.float32))
    mnist = tmp_path / "mnist"
    datafiles.write_mnist(str(mnist), gz=False)
    _truncate(str(mnist / "train-images-idx3-ubyte"))
    cifar = tmp_path / "cifar"
    datafiles.write_cifar(str(cifar), tar=False)
    with open(cifar / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        f.write(datafiles.cifar_batch_bytes(np.zeros((4, 3, 16, 16), np.uint8)))
    for data, root, message in (
            ("npz", bad, f"{bad}:x: images must be uint8 in 0..255, got dtype float32"),
            ("mnist", mnist, "train-images-idx3-ubyte is truncated or corrupt"),
            ("cifar10", cifar, "data_batch_3: 'data' has shape \\(4, 768\\), expected \\(N, 3072\\)")):
        with pytest.raises(SystemExit, match=message):
            T.main(["--preset", "tiny", "--data", data, "--data-root", str(root), "--no-download",
                    "--out", str(tmp_path / "run")])


def test_bad_evaluate_arguments_fail_in_one_line(reference, tmp_path):
    (tmp_path / "empty").mkdir()
    for argv, message in (
            ([str(tmp_path / "nope")], "does not exist"),
            ([str(tmp_path / "empty")], "no checkpoint found in"),
            ([str(reference), "--num-samples", "0"], "--num-samples must be positive"),
            ([str(reference), "--k", "0"], "--k must be positive"),
            ([str(reference), "--batch-size", "0"], "--batch-size must be positive"),
            ([str(reference), "--max-images", "-2"], "--max-images must be positive"),
            ([str(reference), "--data-root", str(tmp_path / "nope")], "--data-root .* does not exist")):
        with pytest.raises(SystemExit, match=message) as info:
            E.main(argv)
        assert info.value.code.startswith("dvpvae-evaluate: error: ") and "\n" not in info.value.code


@pytest.mark.parametrize("module, argv", [("train", ["--log-every", "0"]), ("evaluate", ["/no/such/run"])])
def test_cli_error_has_no_traceback(module, argv):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", f"dvpvae.{module}", *argv], env=env, cwd=ROOT,
                       capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode == 1 and err.count("\n") == 1 and err.startswith(f"dvpvae-{module}: error: "), err
