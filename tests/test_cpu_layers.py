"""The CPU fast path's layers against the reference PyTorch ops they replace."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dvpvae.cpu_conv import conv_cl
from dvpvae.fast_layers import bilinear_matrix, composed_head, pointwise_conv, upsample_bilinear


def _inputs(n, cin, cout, size, channels_last, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, size, size + 1, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    return x, w, b


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,bias", [(32, 32, True), (1, 32, True), (33, 34, False), (32, 2, True)])
def test_conv_cl_1x1_matches_conv2d_with_gradients(channels_last, cin, cout, bias):
    x, w, b = _inputs(3, cin, cout, 5, channels_last, bias)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]
    grad_out = torch.randn(3, cout, 5, 6, dtype=torch.float64)
    ours = conv_cl(x, w, b)
    ref = F.conv2d(x, w, b)
    torch.testing.assert_close(ours, ref)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    got = torch.autograd.grad(ours, params, grad_out)
    want = torch.autograd.grad(ref, params, grad_out)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_conv_cl_skips_input_gradient_when_not_needed():
    x, w, b = _inputs(2, 4, 3, 4, True)
    w.requires_grad_()
    out = conv_cl(x, w, b)
    (gw,) = torch.autograd.grad(out.sum(), [w])
    torch.testing.assert_close(gw, torch.autograd.grad(F.conv2d(x, w, b).sum(), [w])[0])
    assert x.grad is None


@pytest.mark.parametrize("in_size,out_size", [(7, 14), (7, 28), (14, 28), (5, 7), (3, 3)])
def test_bilinear_matrix_upsampling_matches_interpolate(in_size, out_size):
    x = torch.randn(2, 3, in_size, in_size, dtype=torch.float64, requires_grad=True)
    ours = upsample_bilinear(x, out_size)
    ref = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    rows = bilinear_matrix(out_size, in_size, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(rows.sum(1), torch.ones(out_size, dtype=torch.float64))  # a convex combination


@pytest.mark.parametrize("cin", [1, 3, 8])
def test_pointwise_conv_matches_module(cin):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, 16, 1).double()
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    ours, ref = pointwise_conv(x, conv), conv(x)
    torch.testing.assert_close(ours, ref)
    params = [x, conv.weight, conv.bias]
    for a, e in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("cin,mid,cout", [(1, 32, 1), (3, 24, 100)])
def test_composed_head_matches_two_convolutions(cin, mid, cout):
    torch.manual_seed(0)
    pointwise, conv3x3 = nn.Conv2d(cin, mid, 1).double(), nn.Conv2d(mid, cout, 3, padding=1).double()
    a = torch.randn(2, cin, 6, 7, dtype=torch.float64, requires_grad=True)
    ours, ref = composed_head(a, pointwise, conv3x3), conv3x3(pointwise(a))
    torch.testing.assert_close(ours, ref)  # the border pixels check the bias image
    g = torch.randn_like(ref)
    params = [a, *pointwise.parameters(), *conv3x3.parameters()]
    for p, q in zip(torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(p, q)
