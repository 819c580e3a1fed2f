"""The fast path's 1x1 / 3x3 convolution op and the extension's weight- and bias-gradient kernel."""
import pytest
import torch
import torch.nn.functional as F

from dvpvae import _ext
from dvpvae.cpu_conv import conv_cl, conv_tile, extension_covers, gemm_covers, pointwise_gemm

CL = torch.channels_last
HAVE_KERNEL = _ext.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="needs the built C++ extension on an AVX2 or AVX-512 CPU")
needs_ext = pytest.mark.skipif(not _ext.available(), reason="needs the built C++ extension")
AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


def _pair(n, ci, co, h, w, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g, dtype=dtype).contiguous(memory_format=CL)
    grad = torch.randn(n, co, h, w, generator=g, dtype=dtype).contiguous(memory_format=CL)
    return grad, x


def weight_grads(grad, x, weight, extension):
    """(weight, bias) gradients through the backward op, with the tile the rule gives the
    forward (a 3x3 kernel's extension weight gradient uses its Winograd form)."""
    return torch.ops.dvpvae.conv_cl_backward(grad, x, weight, conv_tile(x, weight), extension, [False, True])[1:]


def _extension_grads(grad, x, k):
    """The extension's weight and bias gradients through the op."""
    return weight_grads(grad, x, torch.empty(grad.shape[1], x.shape[1], k, k), True)


def _exact_grads(grad, x, k):
    w = torch.zeros(grad.shape[1], x.shape[1], k, k, dtype=torch.float64)
    args = (grad.double(), x.double(), w, [grad.shape[1]], [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], 1)
    return torch.ops.aten.convolution_backward(*args, [False, True, True])[1:]


SHAPES = [(3, 32, 32, 7, 7), (2, 32, 32, 14, 14), (2, 40, 8, 5, 6), (1, 8, 4, 1, 1), (4, 16, 12, 28, 28),
          (1, 24, 4, 3, 11), (2, 16, 8, 4, 2), (2, 8, 4, 6, 1)]


@needs_kernel
# A 3x3 weight gradient (Winograd) needs out channels % 8.
@pytest.mark.parametrize("n,ci,co,h,w,k", [s + (k,) for k in (1, 3) for s in SHAPES if k == 1 or s[2] % 8 == 0])
def test_extension_weight_grad_matches_float64(n, ci, co, h, w, k):
    grad, x = _pair(n, ci, co, h, w)
    got_w, got_b = _extension_grads(grad, x, k)
    want_w, want_b = _exact_grads(grad, x, k)
    assert got_w.shape == (co, ci, k, k) and got_w.dtype == torch.float32 and got_w.is_contiguous()
    assert got_b.shape == (co,) and got_b.dtype == torch.float32
    # float32 sums of n*h*w products: error relative to the largest entry, larger for the
    # weight of F(4x4, 3x3), whose transforms scale by up to 8 (test_conv_winograd.py bounds
    # both Winograd forms on the scale of sum |grad| |x|)
    rel = 1e-5 if conv_tile(x, torch.empty(co, ci, k, k)) == 4 else 2e-6
    assert (got_w.double() - want_w).abs().max() <= rel * want_w.abs().max() + 1e-6
    assert (got_b.double() - want_b).abs().max() <= 2e-6 * want_b.abs().max() + 1e-6


@needs_kernel
@pytest.mark.parametrize("make,message", [
    (lambda g, x: (g.double(), x.double()), "float32"),
    (lambda g, x: (g.contiguous(), x.contiguous()), "channels-last"),
    (lambda g, x: (g, x[:, :12].contiguous(memory_format=CL)), "in channels % 8"),
    (lambda g, x: (g[:, :4].contiguous(memory_format=CL), x), "out channels % 8"),
    (lambda g, x: (g[:1], x), "does not match"),
    (lambda g, x: (g[0], x[0]), "4-D"),
])
def test_extension_weight_grad_rejects_bad_arguments(make, message):
    grad, x = _pair(2, 16, 8, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        _extension_grads(*make(grad, x), 3)


@needs_kernel
def test_extension_1x1_weight_grad_needs_out_channels_multiple_of_4():
    grad, x = _pair(2, 16, 8, 5, 5)
    with pytest.raises(RuntimeError, match="out channels % 4"):
        _extension_grads(grad[:, :6].contiguous(memory_format=CL), x, 1)


@needs_ext
@pytest.mark.parametrize("extension", [True, False])
def test_conv_ops_reject_other_kernel_sizes(extension):
    grad, x = _pair(1, 8, 4, 5, 5)
    weight = torch.zeros(4, 8, 5, 5)
    message = r"weight must be \(out, in, 1, 1\) or \(out, in, 3, 3\)"
    for mask in ([False, True], [True, False]):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.dvpvae.conv_cl_backward(grad, x, weight, 0, extension, mask)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dvpvae.conv_cl(x, weight, None, 0)


@pytest.mark.parametrize("use_extension", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_conv_cl_matches_conv2d_with_gradients(use_extension, bias, k):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 16, 6, 7, generator=g).requires_grad_()
    w = (0.1 * torch.randn(8, 16, k, k, generator=g)).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_() if bias else None
    params = [t for t in (x, w, b) if t is not None]
    grad_out = torch.randn(3, 8, 6, 7, generator=g)
    ours = conv_cl(x, w, b, use_extension)
    ref = F.conv2d(x, w, b, padding=k // 2)
    assert ours.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # round-off up to F(4x4, 3x3)'s (the extension's 3x3 form here): 1e-5 of the largest entry
    for got, want in zip(torch.autograd.grad(ours, params, grad_out), torch.autograd.grad(ref, params, grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=max(2e-5, 1e-5 * want.abs().max().item()))


def test_conv_cl_float64_is_exact_through_onednn():
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ours = conv_cl(x, w, None)  # float64 is not the kernel's: oneDNN serves it
    ref = F.conv2d(x, w, None, padding=1)
    torch.testing.assert_close(ours, ref)
    grad_out = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(ours, (x, w), grad_out), torch.autograd.grad(ref, (x, w), grad_out)):
        torch.testing.assert_close(got, want)


@needs_kernel
@pytest.mark.parametrize("k", [1, 3])
def test_weight_grad_kernel_choice_is_a_rule_on_shape_dtype_and_isa(k):
    """The extension's weight gradients on AVX2 and AVX-512 CPUs where they cover the shape,
    within float32 round-off of oneDNN's (F(4x4, 3x3)'s, 1e-5 of the largest entry)."""
    grad, x = _pair(2, 16, 8, 9, 9, seed=3)
    w = torch.zeros(8, 16, k, k)
    assert extension_covers(grad, x, k)
    assert not extension_covers(grad.double(), x.double(), k)
    assert not extension_covers(grad, x[:, :12].contiguous(memory_format=CL), k)  # in channels % 8
    assert not extension_covers(grad[:, :6].contiguous(memory_format=CL), x, k)  # out channels % 4
    assert extension_covers(grad[:, :4].contiguous(memory_format=CL), x, k) == (k == 1)  # 3x3: % 8
    extension = weight_grads(grad, x, w, True)
    onednn = weight_grads(grad, x, w, False)
    for a, b in zip(extension, onednn):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,ci,co,h,w", [(3, 16, 8, 6, 7), (2, 33, 34, 14, 14), (1, 8, 2, 1, 1)])
def test_pointwise_gemm_matches_float64_with_gradients(n, ci, co, h, w, bias):
    """The 1x1 convolution as a product of pixel rows, on every CPU (the rule picks it on AVX-512
    ones): float32 round-off of the float64 convolution, forward and all three gradients."""
    grad_out, x = _pair(n, ci, co, h, w, seed=2)
    g = torch.Generator().manual_seed(3)
    params = [x.requires_grad_(), torch.randn(co, ci, 1, 1, generator=g).requires_grad_()]
    if bias:
        params.append(torch.randn(co, generator=g).requires_grad_())
    exact = [t.detach().double().requires_grad_() for t in params]
    got = pointwise_gemm(params[0], params[1], params[2] if bias else None)
    want = F.conv2d(exact[0], exact[1], exact[2] if bias else None)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    pairs = [(got, want)] + list(zip(torch.autograd.grad(got, params, grad_out),
                                     torch.autograd.grad(want, exact, grad_out.double())))
    for a, e in pairs:
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-5 * (1 + e.abs().max().item()))


def test_gemm_rule_is_float32_1x1_outside_autocast_on_avx512():
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=CL)
    w1 = torch.randn(8, 16, 1, 1)
    assert gemm_covers(x, w1) == AVX512
    assert not gemm_covers(x, torch.randn(8, 16, 3, 3))
    assert not gemm_covers(x.double(), w1.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm_covers(x, w1)


def test_conv_cl_rejects_mismatched_input():
    with pytest.raises(ValueError, match="input \\(1, 16, 4, 4\\) must be \\(N, 32, H, W\\)"):
        conv_cl(torch.randn(1, 16, 4, 4), torch.randn(8, 32, 1, 1), None)


@pytest.mark.parametrize("shape", [(4, 8, 5, 5), (4, 8, 3), (4, 8, 1, 3)])
def test_conv_cl_rejects_other_kernel_shapes(shape):
    x = torch.randn(1, 8, 6, 6)
    with pytest.raises(ValueError, match="1, 1\\) or \\(out, in, 3, 3\\)"):
        conv_cl(x, torch.randn(shape), None)


@needs_ext
@pytest.mark.parametrize("k", [1, 3])
def test_conv_ops_pass_opcheck(k):
    x = torch.randn(2, 8, 4, 5).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 8, k, k, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    grad = torch.randn(2, 4, 4, 5).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.dvpvae.conv_cl.default, (x, w, b, conv_tile(x, w)))
    for extension in (False, HAVE_KERNEL and extension_covers(grad, x, k)):
        for mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(torch.ops.dvpvae.conv_cl_backward.default,
                                  (grad, x.detach(), w.detach(), 0, extension, mask))


@needs_ext
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_conv_cl_traces_as_one_graph(k, autocast):
    """The kernel rules run when a graph is traced (no graph break) and the traced forward and
    backward compute what eager conv_cl does, under bfloat16 autocast as well."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 7, 7, generator=g).requires_grad_()
    w = (0.1 * torch.randn(16, 16, k, k, generator=g)).requires_grad_()
    b = torch.randn(16, generator=g).requires_grad_()

    def f(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return conv_cl(x, w, b).float()

    traced = torch.compile(f, fullgraph=True, dynamic=False, backend="aot_eager")
    got, want = traced(x, w, b), f(x, w, b)
    assert got.dtype == torch.float32
    grad_out = torch.randn(got.shape, generator=g)
    pairs = [(got, want)] + list(zip(torch.autograd.grad(got, (x, w, b), grad_out),
                                     torch.autograd.grad(want, (x, w, b), grad_out)))
    for a, e in pairs:
        if gemm_covers(x, w) and not autocast:
            # Plain PyTorch ops: the traced graph may sum the bias gradient in another order.
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-5)
        else:  # the extension's ops, called as they are
            assert torch.equal(a, e)
