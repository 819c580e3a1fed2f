"""Comparison helpers shared by the kernel tests.

``assert_verbose_allclose`` reports the worst element (index, both values, abs/rel error)
instead of pytest's truncated tensor dump. ``assert_three_way`` is the Mamba/FlashAttention
style check: the kernel output and the reference evaluated in the *same* dtype are both
compared with a high-precision (fp64) reference, and the kernel may be at most twice as
far off as the same-dtype reference plus ``atol``. This scales the tolerance with the
op's genuine rounding sensitivity instead of a hand-tuned rtol per shape.
"""
from __future__ import annotations

import torch

# Default (atol, rtol) per dtype for direct comparisons; the three-way check only uses atol.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def _worst(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float):
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    diff = (a - e).abs()
    excess = diff - (atol + rtol * e.abs())
    # NaN must be reported: nan_to_num would hide it.
    nan = torch.isnan(a) ^ torch.isnan(e)
    excess = torch.where(nan, torch.full_like(excess, float("inf")), excess.nan_to_num(0.0))
    flat = int(torch.argmax(excess))
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
    return idx, a.reshape(-1)[flat].item(), e.reshape(-1)[flat].item(), diff, excess


def assert_verbose_allclose(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
    """``torch.allclose`` that names the worst index and values on failure."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if actual.numel() == 0:
        return
    idx, a, e, diff, excess = _worst(actual, expected, atol, rtol)
    if excess.max() > 0:
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: {bad}/{actual.numel()} elements outside atol={atol:g} rtol={rtol:g}; "
            f"worst at {idx}: actual={a!r} expected={e!r} |diff|={abs(a - e):.3e}; "
            f"max |diff|={diff.max().item():.3e}")


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()


def assert_three_way(out, out_ref, out_hi, atol, name="tensor"):
    """Assert ``err(out, out_hi) <= 2 * err(out_ref, out_hi) + atol``.

    ``out``: fast path; ``out_ref``: reference in the same dtype; ``out_hi``: reference in
    fp64 (for fp64 inputs ``out_ref`` and ``out_hi`` coincide, so this reduces to ``atol``).
    """
    for t, what in ((out, "kernel"), (out_ref, "same-dtype reference")):
        if t.shape != out_hi.shape:
            raise AssertionError(f"{name}: {what} shape {tuple(t.shape)} != {tuple(out_hi.shape)}")
    if torch.isnan(out).any() and not torch.isnan(out_hi).any():
        raise AssertionError(f"{name}: kernel output has NaN where the fp64 reference has none")
    err = max_abs_err(out, out_hi)
    err_ref = max_abs_err(out_ref, out_hi)
    bound = 2 * err_ref + atol
    if not err <= bound:
        idx, a, e, _, _ = _worst(out, out_hi, 0.0, 0.0)
        raise AssertionError(
            f"{name}: kernel max error {err:.3e} > 2 * reference error {err_ref:.3e} + atol "
            f"{atol:g}; worst at {idx}: kernel={a!r} fp64 reference={e!r}")
