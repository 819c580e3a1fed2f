"""The package contract: the Triton-availability predicate, the error every Triton path
raises where it cannot run, and imports that keep kernels/ independent of the model."""
import ast
import os

import pytest
import torch

import dvpvae.kernels
from dvpvae.kernels import _triton, triton_runs_on
from dvpvae.kernels.conv1x1_act import conv1x1_act
from dvpvae.kernels.conv1x1_residual import conv1x1_residual
from dvpvae.kernels.dct_pseudoinput import dct_pseudoinput, idct_pseudoinput
from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step
from dvpvae.kernels.reparam_kl import reparam_kl, reparam_sample

KERNELS_DIR = os.path.dirname(dvpvae.kernels.__file__)


def _calls():
    """One call of every Triton path on valid CPU float32 tensors."""
    x = torch.zeros(1, 2, 8, 8)
    w = torch.zeros(3, 2, 1, 1)
    skip = torch.zeros(1, 3, 8, 8)
    v = torch.zeros(2, 5)
    coef = ddpm_coefficients(4, -6.0, 7.0)
    return {
        "conv1x1_act": lambda: conv1x1_act(x, w, None, "silu"),
        "conv1x1_residual": lambda: conv1x1_residual(x, w, None, skip, 1.0),
        "dct_pseudoinput": lambda: dct_pseudoinput(x, torch.ones(2, 3, 3), 3),
        "idct_pseudoinput": lambda: idct_pseudoinput(torch.zeros(1, 2, 3, 3),
                                                     torch.ones(2, 3, 3), (8, 8)),
        "reparam_kl": lambda: reparam_kl(v, v, v, v, v, -3.0),
        "reparam_sample": lambda: reparam_sample(v, v, v, -3.0, 1.0),
        "ddpm_step": lambda: ddpm_step(v, v, v, coef, 1),
    }


OPS = sorted(_calls())


def test_triton_runs_on_follows_device_and_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_runs_on("cpu") and triton_runs_on(torch.device("cpu"))
    assert triton_runs_on("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_runs_on("cpu")
    assert triton_runs_on(torch.device("cuda", 0))
    monkeypatch.setattr(_triton, "triton", None)
    assert not triton_runs_on("cuda")


@pytest.mark.parametrize("op", OPS)
def test_triton_path_runs_under_the_interpreter(op):
    if not triton_runs_on("cpu"):
        pytest.skip("TRITON_INTERPRET is off")
    _calls()[op]()


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_without_interpreter_raise(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError) as info:
        _calls()[op]()
    msg = str(info.value)
    assert msg.startswith(f"{op}:") and "cannot run on cpu tensors" in msg
    assert "TRITON_INTERPRET=1" in msg and f"{op}_ref" in msg


@pytest.mark.parametrize("op", OPS)
def test_missing_triton_raises(op, monkeypatch):
    monkeypatch.setattr(_triton, "triton", None)
    with pytest.raises(RuntimeError, match=f"{op}: the Triton kernel needs the triton package"):
        _calls()[op]()


def test_kernels_do_not_import_the_model_package():
    """kernels/ reaches its own modules by relative imports and never imports dvpvae."""
    for name in sorted(os.listdir(KERNELS_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(KERNELS_DIR, name)) as f:
            tree = ast.parse(f.read(), name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [] if node.level else [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root not in ("dvpvae", "kernels"), f"{name}:{node.lineno} imports {root}"
