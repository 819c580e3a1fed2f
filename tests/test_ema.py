"""The EMA of the weights: warm-up formula, the plain (paper) update, masked skips, and the
trainer's use of it (config flag, validation of both raw and EMA weights)."""
import math

import pytest
import torch
from datafiles import metric_rows, training_argv

from dvpvae import train as T
from dvpvae.optim import EMA


pytestmark = pytest.mark.usefixtures("one_thread")


class _Scalar(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.p = torch.nn.Parameter(torch.tensor([value]))
        self.register_buffer("b", torch.zeros(1))


def test_warmup_rate_by_hand():
    ema = EMA(_Scalar(0.0), 0.999, warmup=True)
    assert [ema.rate_at(s) for s in range(4)] == [1 / 10, 2 / 11, 3 / 12, 4 / 13]
    assert ema.rate_at(8989) == pytest.approx(8990 / 8999) and ema.rate_at(8989) < 0.999
    assert ema.rate_at(8991) == ema.rate_at(10**6) == 0.999  # (1 + s) / (10 + s) reaches 0.999 at s = 8990
    plain = EMA(_Scalar(0.0), 0.999, warmup=False)
    assert {plain.rate_at(s) for s in (0, 1, 10, 10**6)} == {0.999}


def test_warmup_updates_by_hand():
    model = _Scalar(2.0)
    ema = EMA(model, 0.999, warmup=True)
    expect = 2.0
    for step, value in enumerate([5.0, -1.0, 3.0]):
        with torch.no_grad():
            model.p.fill_(value)
            model.b.fill_(step + 7.0)
        ema.update(model, step)
        r = (1 + step) / (10 + step)
        expect = r * expect + (1 - r) * value
        assert float(ema.module.p) == pytest.approx(expect, rel=1e-6)
        assert float(ema.module.b) == step + 7.0  # buffers are copied, not averaged
    # 2 -> 0.1*2 + 0.9*5 = 4.7 -> (2*4.7 - 9) / 11 -> (3*that + 9*3) / 12
    assert expect == pytest.approx((3 * (2 * 4.7 - 9) / 11 + 27) / 12)


@pytest.mark.parametrize("warmup", [True, False])
def test_share_of_the_initial_weights(warmup):
    """After n steps towards a constant target the initial weights keep a share of
    prod(rates): 1 / C(n + 9, 9) with the warm-up, 0.999^n without it."""
    model = _Scalar(0.0)
    ema = EMA(model, 0.999, warmup=warmup)
    with torch.no_grad():
        model.p.fill_(1.0)
    n = 300
    for step in range(n):
        ema.update(model, step)
    share = 1.0 - float(ema.module.p)
    expect = 1 / math.comb(n + 9, 9) if warmup else 0.999 ** n
    assert share == pytest.approx(expect, abs=2e-6)
    assert (share < 1e-6) if warmup else (share > 0.7)


def test_plain_update_and_masked_skip_are_exact():
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, rate=0.9, warmup=False)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    ema.update(m, 0, torch.tensor(False))  # skipped: bit-identical
    assert all(torch.equal(a, b) for a, b in zip(start, ema.module.parameters()))
    ema.update(m, 1, torch.tensor(True))
    after_one = [p.detach().clone() for p in ema.module.parameters()]
    for s, e, p in zip(start, after_one, m.parameters()):
        assert torch.equal(e, s + (p - s) * (1 - 0.9))  # the paper's update, bit for bit
    ema.update(m, 2)  # no mask: always applied
    for s, e, p in zip(after_one, ema.module.parameters(), m.parameters()):
        assert torch.equal(e, s + (p - s) * (1 - 0.9))
    # The copy's flags are the model's (one compiled pass serves both); no update makes a graph.
    assert [p.requires_grad for p in ema.module.parameters()] == [p.requires_grad for p in m.parameters()]
    assert all(p.grad is None and p.grad_fn is None for p in ema.module.parameters())


def test_invalid_rate_is_rejected():
    with pytest.raises(ValueError, match="rate"):
        EMA(_Scalar(0.0), 1.0, warmup=True)


def test_config_flag_selects_the_plain_ema(tiny_npz, tmp_path):
    p = T.build_parser()
    assert T.config_overrides(p.parse_args(["--ema-warmup", "false"])) == {"ema_warmup": False}
    plain = T.Trainer(p.parse_args(training_argv(tiny_npz, tmp_path / "a", "--ema-warmup", "false",
                                                 "--max-steps", "1")))
    assert plain.config.ema_warmup is False and plain.ema.warmup is False
    warm = T.Trainer(p.parse_args(training_argv(tiny_npz, tmp_path / "b", "--max-steps", "1")))
    assert warm.config.ema_warmup is True and warm.ema.warmup is True  # on by default


def test_validation_reports_raw_and_ema(tiny_npz, tmp_path):
    tr = T.Trainer(T.build_parser().parse_args(training_argv(tiny_npz, tmp_path / "r", "--max-steps", "3",
                                                     "--eval-every", "3")))
    before = tr.validate()  # EMA = raw weights before any step; same draws for both
    assert before["val_nelbo"] == before["val_nelbo_raw"]
    tr.run()
    val = metric_rows(tmp_path / "r", "val")[-1]
    assert all(math.isfinite(val[k]) for k in ("val_loss", "val_nelbo", "val_bpd", "val_nelbo_raw"))
    assert val["val_nelbo"] != val["val_nelbo_raw"]
    assert val["val_nelbo"] == pytest.approx(val["val_bpd"] / tr.model.bits_per_nat)


def test_validation_shows_progress_per_batch(tiny_npz, tmp_path, capsys):
    tr = T.Trainer(T.build_parser().parse_args(training_argv(tiny_npz, tmp_path / "r", "--max-steps", "1",
                                                     "--test-batch-size", "2")))
    calls = []
    tr._val_sums(tr.model, calls.append)
    assert len(tr.val_iter) > 1 and calls == [1] * len(tr.val_iter)
    capsys.readouterr()
    tr.validate()
    err = capsys.readouterr().err
    assert "validating" in err and "EMA weights" in err

