"""Training recipe pieces and the training CLI on a tiny preset and tiny generated data."""
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from datafiles import metric_rows, training_argv
import dvpvae
from dvpvae import train as T
from dvpvae.checkpoint import CheckpointManager, load_tensors, load_training_checkpoint
from dvpvae.optim import CosineSchedule, MaskedAdamax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- recipe pieces

def test_masked_adamax_matches_torch_adamax_and_skips_exactly():
    torch.manual_seed(0)
    ref = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    mine = [p.detach().clone().requires_grad_() for p in ref]
    o_ref = torch.optim.Adamax(ref, lr=1e-2, weight_decay=1e-3, eps=1e-8)
    o_mine = MaskedAdamax(mine, lr=1e-2, weight_decay=1e-3, eps=1e-8)
    for i in range(6):
        g = [torch.randn_like(p) for p in ref]
        for p, q, gg in zip(ref, mine, g):
            p.grad, q.grad = gg.clone(), gg.clone()
        o_ref.step()
        o_mine.step(torch.tensor(True))
        before = [p.detach().clone() for p in mine]
        state = [{k: v.clone() for k, v in o_mine.state[p].items()} for p in mine]
        for p in mine:
            p.grad = torch.full_like(p, float("nan") if i % 2 else float("inf"))
        o_mine.step(torch.tensor(False))  # skipped: nothing may move, not even the step count
        assert all(torch.equal(a, b) for a, b in zip(before, mine))
        assert all(torch.equal(v, o_mine.state[p][k]) for s, p in zip(state, mine) for k, v in s.items())
    for p, q in zip(ref, mine):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o_mine.state[q]["exp_inf"], o_ref.state[p]["exp_inf"])
    assert float(o_mine.state[mine[0]]["step"]) == 6


def test_masked_adamax_keeps_each_parameter_step_count():
    # A parameter without a gradient is not updated and its bias correction lags behind.
    torch.manual_seed(1)
    ref = [torch.randn(4, 2, requires_grad=True), torch.randn(3, requires_grad=True)]
    mine = [p.detach().clone().requires_grad_() for p in ref]
    o_ref = torch.optim.Adamax(ref, lr=1e-2, weight_decay=1e-3)
    o_mine = MaskedAdamax(mine, lr=1e-2, weight_decay=1e-3)
    for i in range(5):
        for j, (p, q) in enumerate(zip(ref, mine)):
            g = None if (j == 1 and i % 2) else torch.randn_like(p)
            p.grad, q.grad = g, (None if g is None else g.clone())
        o_ref.step()
        o_mine.step(torch.tensor(True))
    assert [float(o_mine.state[p]["step"]) for p in mine] == [5, 3]
    for p, q in zip(ref, mine):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_skip_before_first_step_keeps_fresh_state_finite():
    p = torch.zeros(3, requires_grad=True)
    opt = MaskedAdamax([p], lr=0.1)
    p.grad = torch.full((3,), float("nan"))
    opt.step(torch.tensor(False))
    assert torch.equal(p, torch.zeros(3)) and float(opt.state[p]["step"]) == 0
    p.grad = torch.ones(3)
    opt.step(torch.tensor(True))
    torch.testing.assert_close(p.detach(), torch.full((3,), -0.1))


def test_cosine_schedule_shape():
    opt = MaskedAdamax([torch.zeros(1, requires_grad=True)], lr=1.0)
    s = CosineSchedule(opt, lr=1e-2, total_steps=110, warmup_steps=10, eta_min=1e-5)
    assert s.lr_at(0) == pytest.approx(1e-3) and s.lr_at(9) == pytest.approx(1e-2)
    assert s.lr_at(10) == pytest.approx(1e-2)
    assert s.lr_at(60) == pytest.approx(1e-5 + (1e-2 - 1e-5) * 0.5)
    assert s.lr_at(110) == pytest.approx(1e-5) and s.lr_at(500) == pytest.approx(1e-5)
    lrs = [s.lr_at(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.set_step(3) == opt.param_groups[0]["lr"] == pytest.approx(4e-3)


# ----------------------------------------------------------------------------- CLI

def test_every_config_field_has_a_flag():
    p = T.build_parser()
    args = p.parse_args(["--lr", "3e-3", "--latent-scales", "4,4", "--start-scale-at-x", "true",
                         "--activation", "relu", "--grad-skip-thr", "200"])
    assert T.config_overrides(args) == {"lr": 3e-3, "latent_scales": (4, 4), "start_scale_at_x": True,
                                        "activation": "relu", "grad_skip_thr": 200.0}
    import dataclasses
    for f in dataclasses.fields(dvpvae.Config):
        assert hasattr(args, "cfg_" + f.name)
    with pytest.raises(SystemExit):
        p.parse_args(["--latent-scales", "a,b"])
    with pytest.raises(SystemExit):
        p.parse_args(["--no-such-flag", "1"])


# ----------------------------------------------------------------------------- training runs

def test_train_run_writes_everything(tiny_npz, tmp_path):
    out = tmp_path / "run"
    assert T.main(training_argv(tiny_npz, out, "--max-steps", "5", "--eval-every", "4")) == 0
    rows = metric_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) and r["it_s"] > 0 for r in rows)
    assert rows[0]["lr"] == pytest.approx(1e-2 / 4)  # warm-up over one epoch of 4 batches
    assert rows[0]["loss"] > rows[-1]["loss"]
    val = metric_rows(out, "val")
    assert [r["step"] for r in val] == [4, 5]
    for f in ("run.json", "curves.png", "final/config.json", "final/model.safetensors",
              "samples/step-00000004.png", "samples/step-00000005.png"):
        assert os.path.getsize(out / f) > 0, f
    mgr = CheckpointManager(str(out / "checkpoints"))
    assert [s for s, _ in mgr.steps()] == [4, 5]
    # dct_scale comes from the training split and travels with the weights
    from dvpvae.data import first_images, load_dataset
    d = load_dataset("npz", tiny_npz, val_fraction=0.1)
    ref = dvpvae.DVPVAE.from_preset("tiny")
    dvpvae.set_dct_scale(ref, first_images(d.train, 512))
    weights, _ = load_tensors(str(out / "final" / "model.safetensors"))
    assert torch.equal(weights["decoder.pseudoinput.dct_scale"], ref.dct_scale)
    assert float(ref.dct_scale.max()) > 1  # computed, not the initial placeholder
    # a second fresh run into the same folder would mix two runs
    with pytest.raises(SystemExit, match="--resume"):
        T.main(training_argv(tiny_npz, out, "--max-steps", "2"))


@pytest.mark.parametrize("model", ["reference", pytest.param("fast", marks=pytest.mark.slow)])
def test_resume_continues_the_same_trajectory(tiny_npz, tmp_path, model):
    steps = "7"  # crosses an epoch boundary (4 batches per epoch)
    common = ("--model", model, "--max-steps", steps, "--eval-every", "3")
    full = tmp_path / "full"
    T.main(training_argv(tiny_npz, full, *common))

    part = tmp_path / "part"
    trainer = T.Trainer(T.build_parser().parse_args(training_argv(tiny_npz, part, *common)))
    trainer.step_hook = lambda t: t.request_stop() if t.step == 5 else None
    assert trainer.run() == "requested"
    assert CheckpointManager(str(part / "checkpoints")).latest().endswith("step-00000005")
    # A new process: nothing chosen or cached in this one may carry over.
    subprocess.run([sys.executable, "-m", "dvpvae.train", *training_argv(tiny_npz, part, *common, "--resume")],
                   check=True, cwd=ROOT, capture_output=True)

    a, b = metric_rows(full), metric_rows(part)
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for k in ("loss", "bpd", "grad_norm", "lr", "epoch"):
            assert ra[k] == rb[k], (ra["step"], k)
    assert [r["val_loss"] for r in metric_rows(full, "val")] == [r["val_loss"] for r in metric_rows(part, "val")]
    wa, _ = load_tensors(str(full / "final" / "model.safetensors"))  # EMA: exact across resume too
    wb, _ = load_tensors(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


class _NanAt(torch.nn.Module):
    """Wraps the model and poisons the loss at chosen steps of ``trainer``."""

    def __init__(self, trainer, steps):
        super().__init__()
        self.trainer, self.inner, self.steps = [trainer], trainer.model, steps

    def forward(self, x):
        out = self.inner(x)
        if self.trainer[0].step in self.steps:
            out.loss = out.loss * float("nan")
        return out


def test_nonfinite_loss_step_is_skipped_and_counted(tiny_npz, tmp_path):
    tr = T.Trainer(T.build_parser().parse_args(training_argv(tiny_npz, tmp_path / "r", "--max-steps", "4",
                                                     "--eval-every", "100")))
    tr.ddp = _NanAt(tr, {1, 2})
    snaps = []
    tr.step_hook = lambda t: snaps.append(([p.detach().clone() for p in t.model.parameters()],
                                           [p.detach().clone() for p in t.ema.module.parameters()]))
    tr.run()
    rows = metric_rows(tmp_path / "r")
    assert [r["skipped_nonfinite"] for r in rows] == [0, 1, 2, 2]
    assert math.isnan(rows[1]["loss"]) is False and rows[1]["loss"] == 0.0  # no applied step to average
    for i in (1, 2):  # steps 2 and 3 (0-based 1, 2) changed neither weights nor EMA
        assert all(torch.equal(a, b) for a, b in zip(snaps[0][0], snaps[i][0]))
        assert all(torch.equal(a, b) for a, b in zip(snaps[0][1], snaps[i][1]))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[2][0], snaps[3][0]))
    state = tr.optimizer.state[next(p for p in tr.model.parameters() if p in tr.optimizer.state)]
    assert float(state["step"]) == 2
    assert load_training_checkpoint(CheckpointManager(str(tmp_path / "r" / "checkpoints")).latest()) \
        .state["counters"]["skipped_nonfinite"] == 2


def test_grad_skip_threshold_skips_updates(tiny_npz, tmp_path):
    tr = T.Trainer(T.build_parser().parse_args(training_argv(tiny_npz, tmp_path / "r", "--max-steps", "2",
                                                     "--grad-skip-thr", "1e-9")))
    start = [p.detach().clone() for p in tr.model.parameters()]
    tr.run()
    assert metric_rows(tmp_path / "r")[-1]["skipped_grad_norm"] == 2
    assert all(torch.equal(a, b) for a, b in zip(start, tr.model.parameters()))


def test_sigterm_saves_a_checkpoint_first(tiny_npz, tmp_path):
    out = tmp_path / "sig"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    argv = training_argv(tiny_npz, out, "--max-steps", "100000", "--eval-every", "100000")
    proc = subprocess.Popen([sys.executable, "-m", "dvpvae.train", *argv],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "metrics.jsonl").exists() and len(metric_rows(out)) >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopping (SIGTERM)" in err
    ck = load_training_checkpoint(CheckpointManager(str(out / "checkpoints")).latest())
    assert ck.state["step"] >= 2
    assert ck.state["step"] == metric_rows(out)[-1]["step"]
