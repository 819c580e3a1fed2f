"""The evaluation CLI on a tiny trained run."""
import json
import math
import os

import numpy as np
import pytest
import torch

import datafiles
from dvpvae import evaluate as E
from dvpvae import train as T
from dvpvae.checkpoint import CheckpointManager, load_model


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step tiny run on an npz file with a test split."""
    d = tmp_path_factory.mktemp("eval")
    x = ((datafiles.images(90, seed=7) > 160) * 255).astype(np.uint8)[:, 0]
    np.savez(d / "d.npz", x=x[:80], x_test=x[80:])
    torch.set_num_threads(1)
    T.main(["--preset", "tiny", "--data", "npz", "--data-root", str(d / "d.npz"), "--out", str(d / "run"),
            "--max-steps", "3", "--eval-every", "2", "--threads", "1", "--num-samples", "4"])
    return d


def test_evaluate_run_dir_json_and_pngs(run, tmp_path, capsys):
    js = tmp_path / "res.json"
    assert E.main([str(run / "run"), "--k", "6", "--max-images", "7", "--json", str(js),
                   "--num-samples", "4", "--out-dir", str(tmp_path / "png")]) == 0
    res = json.loads(js.read_text())
    for key in ("nelbo", "nll", "bpd", "active_units", "k", "num_images"):
        assert key in res
    assert res["k"] == 6 and res["num_images"] == 7 and res["split"] == "test"
    assert res["data"] == "npz"  # taken from the run's run.json
    assert all(math.isfinite(res[k]) for k in ("nelbo", "nll", "bpd"))
    assert res["bpd"] == pytest.approx(res["nll"] / (math.log(2) * 784))
    assert res["nll"] < res["nelbo"]  # importance sampling tightens the bound of an untrained model
    assert 0.0 <= res["active_units"] <= res["active_units_0.001"] <= 1.0
    # the run folder resolves to its best checkpoint (lowest validation loss)
    assert res["checkpoint"] == CheckpointManager(str(run / "run" / "checkpoints")).best()
    for t in ("1.0", "0.8", "0.6"):
        assert os.path.getsize(tmp_path / "png" / f"samples_t{t}.png") > 0
    out = capsys.readouterr().out
    assert "NLL (IS, k=6)" in out and "active units" in out


def test_evaluate_matches_direct_computation(run):
    """The CLI's numbers are the model's own estimators averaged over images."""
    ckpt = CheckpointManager(str(run / "run" / "checkpoints")).latest()
    model = load_model(ckpt)
    x_u8 = np.load(run / "d.npz")["x_test"][:5, None]
    torch.manual_seed(3)
    res = E.evaluate(model, x_u8, k=4, batch_size=5, chunk_size=64, progress=False)
    torch.manual_seed(3)
    x = torch.from_numpy(x_u8).float() / 127.5 - 1
    with torch.no_grad():
        nelbo = float(-model(x).elbo.mean())
    nll = float(model.estimate_nll(x, k=4, chunk_size=64).mean())
    assert res["nelbo"] == pytest.approx(nelbo, rel=1e-6)
    assert res["nll"] == pytest.approx(nll, rel=1e-6)


def test_evaluate_checkpoint_dir_val_split_and_errors(run, tmp_path):
    ckpt = CheckpointManager(str(run / "run" / "checkpoints")).latest()
    js = tmp_path / "v.json"
    E.main([ckpt, "--split", "val", "--k", "2", "--json", str(js), "--num-samples", "2",
            "--out-dir", str(tmp_path)])
    res = json.loads(js.read_text())
    assert res["num_images"] == 8 and res["split"] == "val"  # 10% of 80 images
    # an npz without x_test has no test split
    np.savez(tmp_path / "notest.npz", x=np.zeros((20, 28, 28), np.uint8))
    with pytest.raises(Exception, match="x_test"):
        E.main([ckpt, "--data", "npz", "--data-root", str(tmp_path / "notest.npz"), "--k", "2"])
    # images of the wrong size for the model
    np.savez(tmp_path / "small.npz", x=np.zeros((20, 8, 8), np.uint8), x_test=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(SystemExit, match="expects"):
        E.main([ckpt, "--data", "npz", "--data-root", str(tmp_path / "small.npz"), "--k", "2"])
