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


pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert res["k"] == 6 and res["num_images"] == 7 and res["split"] == "test"
    assert res["data"] == "npz"  # taken from the run's run.json
    assert res["kinds"] == {"nelbo": "ELBO", "nelbo_trajectory": "ELBO", "nll": "IS",
                            "nll_bound_plugin": "IS, plug-in bound (not valid)"}
    assert res["nll"] <= res["nelbo_trajectory"]  # log-mean-exp >= mean, image by image
    for name in res["kinds"]:
        for key in (name, f"{name}_se", f"{name}_bpd", f"{name}_bpd_se"):
            assert math.isfinite(res[key]), key
        assert res[f"{name}_bpd"] == pytest.approx(res[name] / (math.log(2) * 784))
        assert res[f"{name}_bpd_se"] == pytest.approx(res[f"{name}_se"] / (math.log(2) * 784))
    for name in ("nll", "nll_bound_plugin"):
        assert 1.0 <= res[f"{name}_ess_min"] <= res[f"{name}_ess_mean"] <= 6.0
    assert 0.0 <= res["active_units"] <= res["active_units_0.001"] <= 1.0
    # the run folder resolves to its best checkpoint (lowest validation loss)
    assert res["checkpoint"] == CheckpointManager(str(run / "run" / "checkpoints")).best()
    for t in ("1.0", "0.8", "0.6"):
        assert os.path.getsize(tmp_path / "png" / f"samples_t{t}.png") > 0
    out = capsys.readouterr().out
    assert "NLL (IS, k=6)" in out and "plug-in bound" in out and "ESS mean" in out and "active units" in out


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
        nelbo = -model(x).elbo.double()
    log_w = model.importance_log_weights(x, k=4, chunk_size=64)
    assert res["nelbo"] == pytest.approx(float(nelbo.mean()), rel=1e-6)
    assert res["nelbo_se"] == pytest.approx(float(nelbo.std() / math.sqrt(5)), rel=1e-5)
    for name, estimator in (("nll", "trajectory"), ("nll_bound_plugin", "bound_plugin")):
        nll = -(torch.logsumexp(log_w[estimator].double(), 0) - math.log(4))
        assert res[name] == pytest.approx(float(nll.mean()), rel=1e-6)
        assert res[f"{name}_se"] == pytest.approx(float(nll.std() / math.sqrt(5)), rel=1e-5)
    assert res["nelbo_trajectory"] == pytest.approx(float(-log_w["trajectory"].double().mean()), rel=1e-6)


def test_standard_error_and_effective_sample_size_by_hand():
    assert E.standard_error(torch.tensor([1.0, 2.0, 4.0, 5.0])) == pytest.approx(math.sqrt(10 / 3) / 2)
    assert E.standard_error(torch.tensor([3.0])) is None
    # (sum w)^2 / sum w^2 of the columns (k = 4, N = 3): (1, 1, 1, 1) -> 4, (1, 0, 0, 0) -> 1,
    # (3, 1, 0, 0) -> 16 / 10; given as logs far below exp's range
    w = torch.tensor([[1.0, 1.0, 3.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    ess = E.effective_sample_size(w.log() - 900.0)
    torch.testing.assert_close(ess, torch.tensor([4.0, 1.0, 1.6], dtype=torch.float64))


def test_format_table_shows_standard_errors_and_kinds():
    res = {"k": 10, "num_images": 1, "split": "test", "active_units": 0.5, "active_units_0.001": 0.75,
           "kinds": dict(E.ESTIMATES)}
    for i, name in enumerate(E.ESTIMATES):
        res.update({name: 100.0 + i, f"{name}_se": None if i == 0 else 0.5, f"{name}_bpd": 0.2,
                    f"{name}_bpd_se": None if i == 0 else 0.001})
    for name in E.IS_ESTIMATES:
        res.update({f"{name}_ess_mean": 2.5, f"{name}_ess_min": 1.25})
    lines = {line.split("  ")[0]: line for line in E.format_table(res).splitlines()}
    nelbo, traj = lines["negative ELBO"], lines["negative ELBO, T-step model (k=10)"]
    assert nelbo.split()[2:] == ["100.000", "0.2000", "ELBO"]  # no standard error for one value
    assert "101.000 +- 0.500" in traj and "0.2000 +- 0.0010" in traj and traj.endswith("ELBO")
    assert "102.000 +- 0.500" in lines["NLL (IS, k=10)"]
    assert lines["NLL (IS, k=10)"].endswith("ESS mean 2.50, min 1.25 of 10")
    assert "103.000" in lines["NLL, plug-in bound (k=10, not valid)"]


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
