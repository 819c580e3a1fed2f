"""dct_pseudoinput / idct_pseudoinput: Triton kernels (interpreter) vs the reference, vs scipy.

Three-way checks: the kernel and the same-dtype reference are both compared with the fp64
reference, for the output and the input gradient after backward(randn_like(out)).
"""
import numpy as np
import pytest
import scipy.fft
import torch

from dvpvae.kernels.dct_pseudoinput import (dct_basis, dct_pseudoinput, dct_pseudoinput_ref,
                                            idct_pseudoinput, idct_pseudoinput_ref)
from tests.kernels.utils import assert_three_way, assert_verbose_allclose

# (dtype, atol): atol of the three-way check; the orthonormal DCT keeps magnitudes O(1)
# (the DC term is O(sqrt(H*W)) before division by its scale), so absolute tolerances fit.
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-12)]

# (N, C, H, W, ctx): the three paper presets (MNIST, OMNIGLOT, CIFAR10), then batch 1,
# odd/prime and non-square planes, ctx == H (no crop) and ctx == 1 (DC only).
SHAPES = [
    (2, 1, 28, 28, 7),
    (2, 1, 28, 28, 5),
    (2, 3, 32, 32, 7),
    (1, 2, 13, 11, 3),
    (3, 1, 17, 17, 17),
    (1, 1, 5, 7, 1),
]


def _scale(c, k, dtype, ac_max):
    """Positive scale: large DC entry (as the data-derived scale has), random AC entries
    small enough that a fraction of the coefficients clamp, so the clamp mask is exercised."""
    s = torch.rand(c, k, k, dtype=torch.float64) * ac_max + 0.05
    s[:, 0, 0] = 20.0
    return s.to(dtype)


def _run(fn, inp, *args, grad=None):
    inp = inp.detach().clone().requires_grad_(True)
    out = fn(inp, *args)
    out.backward(grad if grad is not None else torch.randn_like(out))
    return out.detach(), inp.grad


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_three_way(shape, dtype, atol):
    n, c, h, w, k = shape
    x = (torch.rand(n, c, h, w, dtype=torch.float64) * 2 - 1).to(dtype)
    scale = _scale(c, k, dtype, 0.6)
    grad = torch.randn(n, c, k, k, dtype=dtype)
    u, gx = _run(dct_pseudoinput, x, scale, k, grad=grad)
    u_ref, gx_ref = _run(dct_pseudoinput_ref, x, scale, k, grad=grad)
    u_hi, gx_hi = _run(dct_pseudoinput_ref, x.double(), scale.double(), k, grad=grad.double())
    assert u.dtype == dtype and u.shape == (n, c, k, k) and u.is_contiguous()
    assert_three_way(u, u_ref, u_hi, atol, name="u")
    assert_three_way(gx, gx_ref, gx_hi, atol, name="grad_x")
    clamped = (u_hi.abs() == 1).float().mean().item()
    if k > 1:
        assert 0.0 < clamped < 1.0, "test data should exercise clamped and unclamped entries"


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_inverse_three_way(shape, dtype, atol):
    n, c, h, w, k = shape
    u = torch.rand(n, c, k, k, dtype=torch.float64) * 2 - 1
    u[:, :, 0, 0] = u[:, :, 0, 0].abs() * 0.5 + 0.4  # image mean ~0.3-0.7, some pixels clamp
    u = u.to(dtype)
    scale = _scale(c, k, dtype, 3.0) * (h * w) ** 0.5 / 28
    grad = torch.randn(n, c, h, w, dtype=dtype)
    x, gu = _run(idct_pseudoinput, u, scale, (h, w), grad=grad)
    x_ref, gu_ref = _run(idct_pseudoinput_ref, u, scale, (h, w), grad=grad)
    x_hi, gu_hi = _run(idct_pseudoinput_ref, u.double(), scale.double(), (h, w),
                       grad=grad.double())
    assert x.dtype == dtype and x.shape == (n, c, h, w) and x.is_contiguous()
    assert_three_way(x, x_ref, x_hi, atol, name="x")
    assert_three_way(gu, gu_ref, gu_hi, atol, name="grad_u")


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_against_scipy(shape):
    """Independent oracle: scipy's orthonormal DCT-II/III on the full plane, then crop/pad."""
    n, c, h, w, k = shape
    x = torch.rand(n, c, h, w, dtype=torch.float64) * 2 - 1
    scale = _scale(c, k, torch.float64, 0.6)
    coef = scipy.fft.dctn((x.numpy() + 1) / 2, type=2, axes=(2, 3), norm="ortho")
    expect = np.clip(coef[:, :, :k, :k] / scale.numpy(), -1, 1)
    for name, op in (("triton", dct_pseudoinput), ("reference", dct_pseudoinput_ref)):
        u = op(x, scale, k)
        assert_verbose_allclose(u, torch.from_numpy(expect), atol=1e-12, rtol=0, name=name)

    u = torch.rand(n, c, k, k, dtype=torch.float64) * 2 - 1
    u[:, :, 0, 0] = 0.6
    padded = np.zeros((n, c, h, w))
    padded[:, :, :k, :k] = (u * scale).numpy()
    img = scipy.fft.idctn(padded, type=2, axes=(2, 3), norm="ortho")
    expect = 2 * np.clip(img, 0, 1) - 1
    for name, op in (("triton", idct_pseudoinput), ("reference", idct_pseudoinput_ref)):
        xr = op(u, scale, (h, w))
        assert_verbose_allclose(xr, torch.from_numpy(expect), atol=1e-12, rtol=0, name=name)


def test_roundtrip_and_basis():
    """D is orthonormal; with ctx == H and a large scale, idct(dct(x)) == x."""
    d = dct_basis(11, 11, torch.float64, torch.device("cpu"))
    assert_verbose_allclose(d @ d.t(), torch.eye(11, dtype=torch.float64), atol=1e-13, rtol=0)
    assert dct_basis(11, 11, torch.float64, torch.device("cpu")) is d  # cached
    x = torch.rand(1, 2, 9, 9, dtype=torch.float64) * 2 - 1
    scale = torch.full((2, 9, 9), 100.0, dtype=torch.float64)
    u = dct_pseudoinput(x, scale, 9)
    assert_verbose_allclose(idct_pseudoinput(u, scale, (9, 9)), x, atol=1e-12, rtol=0)


def test_strided_inputs_and_grads():
    """Non-contiguous x, u and incoming gradients go through the strided kernel loads."""
    x = (torch.rand(2, 1, 28, 28, dtype=torch.float64) * 2 - 1).transpose(2, 3)
    scale = _scale(1, 7, torch.float64, 0.6)
    g = torch.randn(2, 1, 7, 7, dtype=torch.float64).transpose(2, 3)
    u, gx = _run(dct_pseudoinput, x, scale, 7, grad=g)
    u_ref, gx_ref = _run(dct_pseudoinput_ref, x, scale, 7, grad=g)
    assert_verbose_allclose(u, u_ref, atol=1e-12, rtol=0, name="u")
    assert_verbose_allclose(gx, gx_ref, atol=1e-12, rtol=0, name="grad_x")
    uu = torch.rand(1, 3, 7, 7, dtype=torch.float64)[:, [2, 0, 1]]
    s3 = _scale(3, 7, torch.float64, 1.0).transpose(1, 2)
    g = torch.randn(1, 3, 32, 32, dtype=torch.float64).transpose(2, 3)
    y, gu = _run(idct_pseudoinput, uu, s3, (32, 32), grad=g)
    y_ref, gu_ref = _run(idct_pseudoinput_ref, uu, s3, (32, 32), grad=g)
    assert_verbose_allclose(y, y_ref, atol=1e-12, rtol=0, name="x")
    assert_verbose_allclose(gu, gu_ref, atol=1e-12, rtol=0, name="grad_u")


@pytest.mark.parametrize("dct,idct", [(dct_pseudoinput, idct_pseudoinput),
                                      (dct_pseudoinput_ref, idct_pseudoinput_ref)],
                         ids=["triton", "reference"])
def test_bad_inputs_raise(dct, idct):
    x = torch.zeros(2, 3, 16, 16)
    s = torch.ones(3, 4, 4)
    cases = [
        lambda: dct(torch.zeros(3, 16, 16), s, 4),  # 3-D
        lambda: dct(x, s, 17),                      # ctx > H
        lambda: dct(x, s, 0),
        lambda: dct(x, torch.ones(3, 5, 5), 4),     # scale shape
        lambda: dct(x, torch.ones(1, 4, 4), 4),     # channels
        lambda: dct(x, s.double(), 4),              # dtype
        lambda: dct(x.long(), s, 4),
        lambda: idct(torch.zeros(2, 3, 4, 5), s, (16, 16)),
        lambda: idct(torch.zeros(2, 3, 4, 4), s, (3, 16)),
        lambda: idct(torch.zeros(2, 3, 4, 4), s, 16),
        lambda: idct(torch.zeros(2, 2, 4, 4), s, (16, 16)),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


def test_triton_specific_limits_raise():
    s = torch.ones(1, 4, 4)
    with pytest.raises(ValueError, match="float32/float64"):
        dct_pseudoinput(torch.zeros(1, 1, 8, 8, dtype=torch.float16), s.half(), 4)
    with pytest.raises(ValueError, match="H, W <="):
        dct_pseudoinput(torch.zeros(1, 1, 130, 8), s, 4)
    with pytest.raises(ValueError, match="non-trainable"):
        dct_pseudoinput(torch.zeros(1, 1, 8, 8), s.requires_grad_(True), 4)
