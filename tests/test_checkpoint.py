"""Checkpoints: safetensors + JSON round trips, atomicity, retention, clear errors, no pickle."""
import json
import os
import random
import sys
import warnings

import numpy as np
import pytest
import torch

import dvpvae
from dvpvae import checkpoint as C
from dvpvae.checkpoint import CheckpointError, CheckpointManager
from dvpvae.optim import EMA, MaskedAdamax


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_tiny(steps=2):
    torch.manual_seed(0)
    model = dvpvae.DVPVAE.from_preset("tiny")
    dvpvae.set_dct_scale(model, torch.rand(32, 1, 28, 28) * 2 - 1)
    opt = MaskedAdamax(model.parameters(), lr=1e-3, weight_decay=1e-6)
    ema = EMA(model, 0.9, warmup=False)
    for step in range(steps):
        opt.zero_grad()
        model(torch.rand(4, 1, 28, 28) * 2 - 1).loss.backward()
        opt.step()
        ema.update(model, step)
    return model, opt, ema


def test_training_checkpoint_roundtrip(tmp_path):
    model, opt, ema = _trained_tiny()
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(7, model, model.config, ema=ema.module, optimizer=opt,
                    state={"epoch": 1, "batch_in_epoch": 3, "counters": {"skipped_nonfinite": 2}})
    assert sorted(os.listdir(path)) == ["config.json", "ema.safetensors", "model.safetensors",
                                        "state.json", "state.safetensors"]
    ck = C.load_training_checkpoint(path)
    assert ck.config == model.config
    assert ck.state["step"] == 7 and ck.state["batch_in_epoch"] == 3
    assert ck.state["counters"] == {"skipped_nonfinite": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model[k], v), k
    for k, v in ema.module.state_dict().items():
        assert torch.equal(ck.ema[k], v), k
    assert any(not torch.equal(ck.ema[k], ck.model[k]) for k in ck.model)  # EMA is its own copy
    # optimizer state restores bit-exactly into a fresh optimizer
    model2 = dvpvae.DVPVAE.from_preset("tiny")
    C.load_into(model2, ck.model, "test")
    opt2 = MaskedAdamax(model2.parameters(), lr=5.0)
    opt2.load_state_dict(ck.optimizer)
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    with_state = [(p, q) for p, q in zip(model.parameters(), model2.parameters()) if p in opt.state]
    assert len(with_state) == len(opt2.state) > 10
    for p, q in with_state:
        for key in ("step", "exp_avg", "exp_inf"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])


def test_rng_states_restore(tmp_path):
    model, opt, _ = _trained_tiny(1)
    torch.manual_seed(5), np.random.seed(5), random.seed(5)
    path = CheckpointManager(str(tmp_path)).save(1, model, model.config, optimizer=opt,
                                                 state={"epoch": 0, "batch_in_epoch": 1})
    expect = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    C.load_training_checkpoint(path).restore_rng()
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expect[0], got[0]) and np.array_equal(expect[1], got[1]) and expect[2] == got[2]


class _Shared(torch.nn.Module):
    """Registers one submodule under two names, as the research code does with its prior."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = self.a


def test_aliased_tensors_are_stored_once(tmp_path):
    m = _Shared()
    C.atomic_write(str(tmp_path / "w.safetensors"), C._tensor_bytes(m.state_dict()))
    state, _ = C.load_tensors(str(tmp_path / "w.safetensors"))
    assert set(state) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    m2 = _Shared()
    C.load_into(m2, state, "test")
    assert torch.equal(m2.b.weight, m.a.weight)


def test_corrupt_and_missing_files_give_clear_errors(tmp_path):
    model, opt, ema = _trained_tiny(1)
    mgr = CheckpointManager(str(tmp_path))
    path = mgr.save(1, model, model.config, ema=ema.module, optimizer=opt,
                    state={"epoch": 0, "batch_in_epoch": 1})
    f = os.path.join(path, "model.safetensors")
    blob = open(f, "rb").read()
    open(f, "wb").write(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated.*model.safetensors|model.safetensors"):
        C.load_training_checkpoint(path)
    open(f, "wb").write(blob)
    s = os.path.join(path, "state.json")
    good = open(s).read()
    open(s, "w").write(good[:-20])
    with pytest.raises(CheckpointError, match="corrupt checkpoint file .*state.json"):
        C.load_training_checkpoint(path)
    os.remove(s)
    with pytest.raises(CheckpointError, match="missing checkpoint file.*state.json"):
        C.load_training_checkpoint(path)
    cfg = os.path.join(path, "config.json")
    open(cfg, "w").write(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match="config.json is not a valid dvpvae config.*hello"):
        C.load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        C.load_model(str(tmp_path / "nope"))


def test_manager_keeps_last_n_and_best(tmp_path):
    model, _, _ = _trained_tiny(0)
    mgr = CheckpointManager(str(tmp_path), keep_last=2)
    for step, val in ((1, 5.0), (2, 3.0), (3, 4.0), (4, None), (5, 6.0)):
        mgr.save(step, model, model.config, val_loss=val)
    assert [s for s, _ in mgr.steps()] == [2, 4, 5]
    assert mgr.best().endswith("step-00000002") and mgr.latest().endswith("step-00000005")
    assert mgr.best_info()["val_loss"] == 3.0
    # an abandoned temporary directory is ignored and leaves no trace in the listing
    os.makedirs(tmp_path / ".tmp-step-00000009-1")
    assert mgr.latest().endswith("step-00000005")
    # re-saving the same step replaces it atomically
    mgr.save(5, model, model.config)
    assert [s for s, _ in mgr.steps()] == [2, 4, 5]
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n or ".tmp-step-00000005" in n]


def test_resolve_run_folder_prefers_best(tmp_path):
    model, _, _ = _trained_tiny(0)
    mgr = CheckpointManager(str(tmp_path / "checkpoints"))
    mgr.save(1, model, model.config, val_loss=1.0)
    mgr.save(2, model, model.config, val_loss=2.0)
    assert C.resolve(str(tmp_path)).endswith("step-00000001")
    assert C.resolve(str(tmp_path / "checkpoints" / "step-00000002")).endswith("step-00000002")
    os.makedirs(tmp_path / "empty_run")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        C.resolve(str(tmp_path / "empty_run"))


def test_fast_model_falls_back_with_warning(monkeypatch):
    monkeypatch.setitem(sys.modules, "dvpvae.fast", None)  # makes the fast module unimportable
    cfg = dvpvae.get_config("tiny")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = C.build_model(cfg, "fast")
    assert type(m) is dvpvae.DVPVAE
    assert any("FastDVPVAE is not available" in str(x.message) for x in w)
    with pytest.raises(ValueError, match="unknown model kind"):
        C.build_model(cfg, "turbo")


def test_loaded_tensors_do_not_depend_on_the_file(tmp_path):
    # a tensor backed by the file's mapping would die with SIGBUS when the file is rewritten
    path = tmp_path / "w.safetensors"
    path.write_bytes(C._tensor_bytes({"a": torch.arange(1 << 20, dtype=torch.float32)}))
    state, _ = C.load_tensors(str(path))
    path.write_bytes(b"")
    assert float(state["a"][-1]) == (1 << 20) - 1


def test_weights_in_the_earlier_config_layout_still_load(tmp_path):
    # Earlier versions nested the Config fields under "config" next to a format tag.
    model = dvpvae.DVPVAE("tiny")
    with torch.no_grad():
        model.dct_scale.fill_(0.5)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"format": "dvpvae", "version": 1, "config": model.config.to_dict(), "model_class": "DVPVAE"}))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    loaded = C.load_model(str(folder))
    assert loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
