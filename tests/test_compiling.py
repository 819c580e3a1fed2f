"""compile_pass: the package's autograd formulas are part of the compile caches' keys."""
import torch
from torch._dynamo.utils import counters

from dvpvae import compiling
from dvpvae.cpu_conv import conv_cl


def _loss(x, w):
    return conv_cl(x, w, None).square().sum()


def _compile_and_step(x, w):
    torch._dynamo.reset()
    counters.clear()
    compiling.compile_pass(_loss)(x, w).backward()
    return dict(counters["aot_autograd"])


def test_a_changed_autograd_formula_misses_the_warm_cache(monkeypatch, tmp_path):
    """A warm cache serves the same formulas, and a changed formula key compiles afresh
    instead of reusing a backward graph traced from the old formula."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)
    first = _compile_and_step(x, w)
    assert first.get("autograd_cache_miss", 0) >= 1
    assert _compile_and_step(x, w).get("autograd_cache_hit", 0) >= 1
    monkeypatch.setattr(compiling, "formula_key", lambda: "another formula")
    changed = _compile_and_step(x, w)
    assert changed.get("autograd_cache_miss", 0) >= 1 and changed.get("autograd_cache_hit", 0) == 0
    torch._dynamo.reset()


def test_formula_key_is_the_pass_uuid():
    key = compiling.formula_key()
    assert len(key) == 64 and key == compiling._FormulaKey().uuid()
