"""Hub-style weights: save_pretrained / from_pretrained (huggingface_hub's PyTorchModelHubMixin)
for DVPVAE and FastDVPVAE, offline on local folders, and ``python -m dvpvae.export``."""
import json
import os
import pickle
import types

import pytest
import torch
from datafiles import training_argv

import dvpvae
from dvpvae import export
from dvpvae.checkpoint import CheckpointError, CheckpointManager, load_model, load_training_checkpoint
from dvpvae.fast import FastDVPVAE

FAST_FLAGS = dict(compile=False, cuda_graphs=False)
FILES = ["README.md", "config.json", "model.safetensors"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(cls=dvpvae.DVPVAE, **flags):
    torch.manual_seed(0)
    model = cls("tiny", **flags)
    dvpvae.set_dct_scale(model, torch.rand(64, 1, 28, 28) * 2 - 1)  # not the placeholder of ones
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # no zero-initialised layer left
    return model.eval()


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls,flags", [(dvpvae.DVPVAE, {}), (FastDVPVAE, FAST_FLAGS)],
                         ids=["DVPVAE", "FastDVPVAE"])
def test_round_trip_is_exact_and_never_unpickles(tmp_path, monkeypatch, cls, flags):
    model = _tiny(cls, **flags)
    model.save_pretrained(tmp_path / "w")
    assert sorted(os.listdir(tmp_path / "w")) == FILES
    assert json.load(open(tmp_path / "w" / "config.json")) == model.config.to_dict()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")] == []

    import huggingface_hub.hub_mixin

    import dvpvae.model

    def refuse(*a, **k):
        raise AssertionError("from_pretrained of a folder must neither unpickle nor download")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load"),
                      (huggingface_hub.hub_mixin, "hf_hub_download"), (dvpvae.model, "hf_hub_download")):
        monkeypatch.setattr(mod, name, refuse)
    loaded = cls.from_pretrained(tmp_path / "w", **flags)
    assert type(loaded) is cls and not loaded.training and loaded.config == model.config
    _assert_same_state(model, loaded)
    assert float(loaded.dct_scale.max()) > 1 and torch.equal(loaded.dct_scale, model.dct_scale)

    x = torch.rand(3, 1, 28, 28) * 2 - 1
    rec = dvpvae.Noise(generator=torch.Generator().manual_seed(1), record=True)
    a = model(x, rec)
    b = loaded(x, rec.recorded)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.elbo, b.elbo)


def test_either_class_reads_the_others_folder(tmp_path):
    ref = _tiny()
    ref.save_pretrained(tmp_path / "ref")
    fast = FastDVPVAE.from_pretrained(str(tmp_path / "ref"), **FAST_FLAGS)
    assert type(fast) is FastDVPVAE and fast.use_compile is False
    _assert_same_state(ref, fast)
    fast.save_pretrained(tmp_path / "fast")
    _assert_same_state(ref, dvpvae.DVPVAE.from_pretrained(tmp_path / "fast"))
    # constructor options and Config overrides pass through
    assert dvpvae.DVPVAE.from_pretrained(tmp_path / "ref", is_k=7).config.is_k == 7


def _edit_config(folder, **changes):
    path = folder / "config.json"
    d = json.load(open(path))
    d.update(changes)
    open(path, "w").write(json.dumps(d))


def test_config_that_does_not_match_the_weights_names_the_keys(tmp_path):
    w = tmp_path / "w"
    _tiny().save_pretrained(w)
    _edit_config(w, num_ch=32)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*shape mismatches: "
                                              r"encoder\.input_conv\.weight: checkpoint \(16, 1, 1, 1\) vs model \(32, 1, 1, 1\)"):
        dvpvae.DVPVAE.from_pretrained(w)
    _edit_config(w, num_ch=16, latent_scales=[3, 1], latent_width=[1, 1])
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.blocks\.\d\."):
        dvpvae.DVPVAE.from_pretrained(w)
    _edit_config(w, latent_scales=[1, 1])
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.blocks\.\d\."):
        FastDVPVAE.from_pretrained(w, **FAST_FLAGS)
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.blocks\.\d\."):
        load_model(str(w))  # the path of python -m dvpvae.evaluate
    _edit_config(w, latent_scales=[2, 1], no_such_field=1)
    with pytest.raises(CheckpointError, match=r"config\.json is not a valid dvpvae config.*no_such_field"):
        dvpvae.DVPVAE.from_pretrained(w)
    os.remove(w / "config.json")
    with pytest.raises(CheckpointError, match="has no config.json"):
        dvpvae.DVPVAE.from_pretrained(w)


def test_save_replaces_the_folder_in_one_step(tmp_path, monkeypatch):
    w = tmp_path / "w"
    first = _tiny()
    first.save_pretrained(w)
    open(w / "README.md", "w").write("my card\n")
    before = {f: open(w / f, "rb").read() for f in FILES}

    second = dvpvae.DVPVAE("tiny")

    def write_half_then_fail(self, folder):
        open(os.path.join(folder, "model.safetensors"), "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(dvpvae.DVPVAE, "_save_pretrained", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        second.save_pretrained(w)
    assert {f: open(w / f, "rb").read() for f in FILES} == before  # the old folder, whole
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary left behind
    monkeypatch.undo()

    second.save_pretrained(w)
    _assert_same_state(second, dvpvae.DVPVAE.from_pretrained(w))
    assert open(w / "README.md").read() == "my card\n"  # an existing model card is kept
    assert sorted(os.listdir(tmp_path)) == ["w"]

    open(w / "notes.txt", "w").write("mine")
    with pytest.raises(ValueError, match="notes.txt.*refusing to replace"):
        second.save_pretrained(w)
    assert os.path.isfile(w / "notes.txt")


def test_repo_id_goes_through_the_hub_download(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin

    import dvpvae.model
    model = _tiny()
    model.save_pretrained(tmp_path / "w")
    asked = []

    def fake_download(repo_id, filename, **kw):
        asked.append((repo_id, filename, kw.get("revision")))
        return str(tmp_path / "w" / filename)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_download)
    monkeypatch.setattr(dvpvae.model, "hf_hub_download", fake_download)
    loaded = dvpvae.DVPVAE.from_pretrained("someone/dvpvae-tiny", revision="v1")
    assert asked == [("someone/dvpvae-tiny", "config.json", "v1"),
                     ("someone/dvpvae-tiny", "model.safetensors", "v1")]
    _assert_same_state(model, loaded)


def test_push_to_hub_uploads_what_save_pretrained_writes(tmp_path, monkeypatch):
    import huggingface_hub.hub_mixin
    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kw):
            return types.SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, repo_id, folder_path, **kw):
            uploaded.update(repo=repo_id, files=sorted(os.listdir(folder_path)),
                            config=json.load(open(os.path.join(folder_path, "config.json"))))
            return "url"
    monkeypatch.setattr(huggingface_hub.hub_mixin, "HfApi", FakeApi)
    model = _tiny()
    assert model.push_to_hub("someone/dvpvae-tiny") == "url"
    assert uploaded == {"repo": "someone/dvpvae-tiny", "files": FILES, "config": model.config.to_dict()}
    with pytest.raises(ValueError, match="pass no config"):
        model.push_to_hub("someone/dvpvae-tiny", config={"num_ch": 3})
    uploaded.clear()
    model.save_pretrained(tmp_path / "dvpvae-tiny", push_to_hub=True)  # repo_id: the folder's name
    assert uploaded == {"repo": "dvpvae-tiny", "files": FILES, "config": model.config.to_dict()}
    assert sorted(os.listdir(tmp_path / "dvpvae-tiny")) == FILES


def test_export_cli_picks_the_best_checkpoint_and_the_ema(tiny_npz, tmp_path, capsys):
    from dvpvae import train as T
    run = tmp_path / "run"
    assert T.main(training_argv(tiny_npz, run, "--max-steps", "3", "--eval-every", "2")) == 0
    mgr = CheckpointManager(str(run / "checkpoints"))
    best = mgr.best()
    assert best is not None and [s for s, _ in mgr.steps()] == [2, 3]
    ck = load_training_checkpoint(best)

    assert export.main([str(run), str(tmp_path / "ema")]) == 0
    msg = capsys.readouterr().out
    assert "EMA weights" in msg and os.path.basename(best) in msg and "best checkpoint" in msg
    loaded = dvpvae.DVPVAE.from_pretrained(tmp_path / "ema")
    assert all(torch.equal(v, ck.ema[k]) for k, v in loaded.state_dict().items())
    assert loaded.config == ck.config

    assert export.main([str(run), str(tmp_path / "raw"), "--no-ema"]) == 0
    assert "trained weights" in capsys.readouterr().out
    raw = load_model(str(tmp_path / "raw"))  # evaluate's loader reads exported folders
    assert all(torch.equal(v, ck.model[k]) for k, v in raw.state_dict().items())
    assert any(not torch.equal(ck.model[k], ck.ema[k]) for k in ck.model)

    latest = mgr.latest()
    assert export.main([latest, str(tmp_path / "ema")]) == 0  # a checkpoint folder; replaces the export
    assert "the folder given" in capsys.readouterr().out
    assert all(torch.equal(v, load_training_checkpoint(latest).ema[k])
               for k, v in dvpvae.DVPVAE.from_pretrained(tmp_path / "ema").state_dict().items())

    with pytest.raises(SystemExit, match="refusing to replace"):
        export.main([str(run), str(run)])  # never deletes a run folder
    with pytest.raises(SystemExit, match="does not exist"):
        export.main([str(tmp_path / "nope"), str(tmp_path / "x")])
