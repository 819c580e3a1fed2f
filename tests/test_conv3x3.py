"""The fast path's 3x3 convolution: the extension's weight-gradient kernel and the custom op."""
import pytest
import torch
import torch.nn.functional as F

from dvpvae import _ext
from dvpvae.cpu_conv import conv3x3_cl, conv3x3_weight_grad, weight_grad_choices

CL = torch.channels_last
HAVE_KERNEL = _ext.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="needs the built C++ extension on an AVX2 CPU")


def _pair(n, ci, co, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=dtype).contiguous(memory_format=CL)
    grad = torch.randn(n, co, h, w, generator=g, dtype=dtype).contiguous(memory_format=CL)
    return grad, x


def _exact_weight_grad(grad, x):
    w = torch.zeros(grad.shape[1], x.shape[1], 3, 3, dtype=torch.float64)
    args = (grad.double(), x.double(), w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    return torch.ops.aten.convolution_backward(*args, [False, True, False])[1]


@needs_kernel
@pytest.mark.parametrize("n,ci,co,h,w", [(3, 32, 32, 7, 7), (2, 32, 32, 14, 14), (2, 40, 8, 5, 6),
                                         (1, 8, 4, 1, 1), (4, 16, 12, 28, 28), (1, 24, 4, 3, 11)])
def test_extension_weight_grad_matches_float64(n, ci, co, h, w):
    grad, x = _pair(n, ci, co, h, w)
    got = torch.ops.dvpvae.conv3x3_weight_grad(grad, x)
    want = _exact_weight_grad(grad, x)
    assert got.shape == (co, ci, 3, 3) and got.dtype == torch.float32 and got.is_contiguous()
    # float32 sums of n*h*w products: error relative to the largest entry
    assert (got.double() - want).abs().max() <= 2e-6 * want.abs().max() + 1e-6


@needs_kernel
@pytest.mark.parametrize("make,message", [
    (lambda g, x: (g.double(), x.double()), "float32"),
    (lambda g, x: (g.contiguous(), x.contiguous()), "channels-last"),
    (lambda g, x: (g, x[:, :12].contiguous(memory_format=CL)), "in channels % 8"),
    (lambda g, x: (g[:, :6].contiguous(memory_format=CL), x), "out channels % 4"),
    (lambda g, x: (g[:1], x), "does not match"),
    (lambda g, x: (g[0], x[0]), "4-D"),
])
def test_extension_weight_grad_rejects_bad_arguments(make, message):
    grad, x = _pair(2, 16, 8, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dvpvae.conv3x3_weight_grad(*make(grad, x))


@pytest.mark.parametrize("backend", ["auto", "extension", "onednn"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv3x3_cl_matches_conv2d_with_gradients(backend, bias):
    if backend == "extension" and not HAVE_KERNEL:
        pytest.skip("needs the built C++ extension on an AVX2 CPU")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 6, 7, generator=g).requires_grad_()
    w = (0.1 * torch.randn(8, 16, 3, 3, generator=g)).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_() if bias else None
    params = [t for t in (x, w, b) if t is not None]
    grad_out = torch.randn(3, 8, 6, 7, generator=g)
    ours = conv3x3_cl(x, w, b, backend)
    ref = F.conv2d(x, w, b, padding=1)
    assert ours.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(torch.autograd.grad(ours, params, grad_out), torch.autograd.grad(ref, params, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


def test_conv3x3_cl_float64_is_exact_through_onednn():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = conv3x3_cl(x, w, None)  # auto: float64 is not the kernel's, oneDNN serves it
    ref = F.conv2d(x, w, None, padding=1)
    torch.testing.assert_close(ours, ref)
    grad_out = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(ours, (x, w), grad_out), torch.autograd.grad(ref, (x, w), grad_out)):
        torch.testing.assert_close(got, want)


@needs_kernel
def test_auto_backend_records_its_choice_and_agrees_with_both():
    grad, x = _pair(2, 16, 8, 9, 9, seed=3)
    w = torch.zeros(8, 16, 3, 3)
    auto = conv3x3_weight_grad(grad, x, w, "auto")
    key = (tuple(grad.shape), tuple(x.shape), x.dtype, "cpu", torch.get_num_threads())
    assert weight_grad_choices()[key] in ("extension", "onednn")
    for backend in ("extension", "onednn"):
        torch.testing.assert_close(auto, conv3x3_weight_grad(grad, x, w, backend), rtol=1e-5, atol=1e-5)


def test_unknown_weight_grad_backend_is_rejected():
    grad, x = _pair(1, 8, 4, 3, 3)
    with pytest.raises(ValueError, match="unknown weight-gradient backend 'cudnn'"):
        conv3x3_weight_grad(grad, x, torch.zeros(4, 8, 3, 3), "cudnn")


def test_conv3x3_cl_passes_opcheck():
    x = torch.randn(2, 8, 4, 5).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    torch.library.opcheck(torch.ops.dvpvae.conv3x3_cl.default, (x, w, b, "auto"))
