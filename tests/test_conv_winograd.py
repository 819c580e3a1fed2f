"""The extension's Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions and the cpu provider's use
of them."""
import pytest
import torch
import torch.nn.functional as F

from dvpvae import _ext
from dvpvae.cpu_conv import conv_cl, conv_tile, extension_covers, winograd_covers, winograd_tile

CL = torch.channels_last
HAVE_KERNEL = _ext.available() and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason="needs the built C++ extension on an AVX2 or AVX-512 CPU")


def _operands(n, c, k, h, w, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(k, c, 3, 3, generator=g)
    b = torch.randn(k, generator=g) if bias else None
    return x, weight, b


# Error bound of each form (output tile side) per unit of sum |x| |w| + |b|: F(2x2, 3x3) only adds
# and subtracts; F(4x4, 3x3)'s transforms scale by up to 8 and its filter transform by 1/24.
ROUNDING = {2: 2e-6, 4: 1e-5}


def _assert_float32_accurate(got, x, weight, b, tile):
    """Within float32 round-off of the float64 convolution, on the scale of sum |x| |w| + |b|."""
    b64 = None if b is None else b.double()
    want = F.conv2d(x.double(), weight.double(), b64, padding=1)
    scale = F.conv2d(x.double().abs(), weight.double().abs(), None if b is None else b64.abs(), padding=1)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=CL)
    assert ((got.double() - want).abs() <= ROUNDING[tile] * scale + 1e-7).all()


# Odd sizes (half tiles at the edges), 1x1 images, tile counts that are not a multiple of the
# kernel's 6-row register tile or 48-tile block, out channels not a multiple of 16.
SHAPES = [(2, 32, 32, 14, 14), (3, 16, 16, 7, 7), (1, 8, 8, 1, 1), (2, 8, 24, 5, 9), (5, 24, 8, 2, 3),
          (1, 16, 40, 28, 28), (7, 8, 16, 3, 1), (250, 8, 8, 1, 2)]


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n,c,k,h,w", SHAPES)
def test_winograd_matches_float64(n, c, k, h, w, bias, tile):
    x, weight, b = _operands(n, c, k, h, w, bias)
    _assert_float32_accurate(torch.ops.dvpvae.conv_cl(x, weight, b, tile), x, weight, b, tile)


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_does_not_depend_on_thread_count(tile):
    x, weight, b = _operands(6, 16, 16, 9, 11, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dvpvae.conv_cl(x, weight, b, tile)
        torch.set_num_threads(2)
        two = torch.ops.dvpvae.conv_cl(x, weight, b, tile)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
@pytest.mark.parametrize("make,message", [
    (lambda x, w, b: (x.double(), w.double(), b.double()), "float32"),
    (lambda x, w, b: (x.contiguous(), w, b), "channels-last"),
    (lambda x, w, b: (x[:, :12].contiguous(memory_format=CL), w[:, :12], b), "channels % 8"),
    (lambda x, w, b: (x, torch.cat([w, w[:4]]), None), "channels % 8"),
    (lambda x, w, b: (x, w[:, :, :2], b), r"weight must be \(out, in, 1, 1\) or \(out, in, 3, 3\)"),
    (lambda x, w, b: (x, w[:, :8], b), r"weight must be \(out, 16, 3, 3\)"),
    (lambda x, w, b: (x, w, b[:4]), r"bias must be float32 \(8\)"),
    (lambda x, w, b: (x[0], w, b), "4-D"),
])
def test_winograd_rejects_bad_arguments(make, message):
    x, weight, b = _operands(2, 16, 8, 5, 5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dvpvae.conv_cl(*make(x, weight, b), 2)


@needs_kernel
@pytest.mark.parametrize("tile", [1, 3, 6])
def test_conv_ops_reject_other_tiles(tile):
    x, weight, b = _operands(2, 16, 8, 5, 5)
    grad = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    for call in (lambda: torch.ops.dvpvae.conv_cl(x, weight, b, tile),
                 lambda: torch.ops.dvpvae.conv_cl_backward(grad, x, weight, tile, False, [True, False])):
        with pytest.raises(RuntimeError, match=rf"tile must be 0 .*, 2 .* or 4 .*, got {tile}"):
            call()


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_passes_opcheck(tile):
    x, weight, b = _operands(2, 8, 16, 5, 6)
    torch.library.opcheck(torch.ops.dvpvae.conv_cl.default, (x, weight, b, tile))
    torch.library.opcheck(torch.ops.dvpvae.conv_cl.default, (x, weight, None, tile))
    grad = torch.randn(2, 16, 5, 6).contiguous(memory_format=CL)
    for mask in ([True, False], [True, True]):
        torch.library.opcheck(torch.ops.dvpvae.conv_cl_backward.default, (grad, x, weight, tile, True, mask))


@pytest.mark.parametrize("size,tile", [((28, 28), 4), ((14, 14), 4), ((7, 7), 4), ((6, 7), 4), ((1, 1), 2),
                                       ((2, 3), 2), ((3, 3), 4), ((32, 1), 2)])
def test_winograd_tile_takes_the_form_with_fewer_points(size, tile):
    """F(4x4, 3x3) where its 36 points per 4x4 tile cover the image with fewer points than
    F(2x2, 3x3)'s 16 per 2x2 tile (the MNIST ladder's 28, 14 and 7), else F(2x2, 3x3)."""
    assert winograd_tile(*size) == tile


@needs_kernel
def test_cpu_provider_convolution_uses_winograd_by_rule():
    """A covered 3x3 conv_cl computes the Winograd kernels' numbers in every pass: the forward,
    the input gradient (the flipped kernel's convolution of the output gradient) and the
    weight and bias gradients, all with the forward's tile."""
    x, weight, b = _operands(3, 16, 8, 6, 7, seed=4)
    grad = torch.randn(3, 8, 6, 7).contiguous(memory_format=CL)
    x.requires_grad_(), weight.requires_grad_(), b.requires_grad_()
    assert winograd_covers(x, weight)
    assert not winograd_covers(x.double(), weight.double())
    assert not winograd_covers(x[:, :12], weight[:, :12])
    assert not winograd_covers(x, weight[:4])
    assert not winograd_covers(x, torch.randn(8, 16, 1, 1))
    tile = winograd_tile(6, 7)
    assert conv_tile(x, weight) == tile
    assert extension_covers(grad, x, 3)
    out = conv_cl(x, weight, b, True)
    grads = torch.autograd.grad(out, (x, weight, b), grad)
    x, weight, b = x.detach(), weight.detach(), b.detach()
    flipped = weight.flip(2, 3).transpose(0, 1)
    assert torch.equal(out, torch.ops.dvpvae.conv_cl(x, weight, b, tile))
    assert torch.equal(grads[0], torch.ops.dvpvae.conv_cl(grad, flipped, None, tile))
    kernel_grads = torch.ops.dvpvae.conv_cl_backward(grad, x, weight, tile, True, [True, True])
    assert all(torch.equal(g, k) for g, k in zip(grads, kernel_grads))
    _assert_float32_accurate(out.detach(), x, weight, b, tile)
    _assert_float32_accurate(grads[0], grad, flipped, None, tile)
    _assert_weight_grads_accurate(grads[1:], grad, x, tile)


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
def test_winograd_does_not_depend_on_batch_partition(tile):
    """Each output element is one chain of multiply-adds in a fixed order, whatever block and
    register tile its image tile falls in: a sub-batch's outputs are the same bits."""
    x, weight, b = _operands(13, 24, 40, 9, 10, seed=5)
    grad = torch.randn(13, 40, 9, 10).contiguous(memory_format=CL)
    full = torch.ops.dvpvae.conv_cl(x, weight, b, tile)
    grad_x = torch.ops.dvpvae.conv_cl_backward(grad, x, weight, tile, False, [True, False])[0]
    for lo, hi in ((0, 1), (3, 8), (5, 13)):
        part = x[lo:hi].contiguous(memory_format=CL)
        assert torch.equal(torch.ops.dvpvae.conv_cl(part, weight, b, tile), full[lo:hi])
        part_grad = grad[lo:hi].contiguous(memory_format=CL)
        assert torch.equal(torch.ops.dvpvae.conv_cl_backward(part_grad, part, weight, tile, False, [True, False])[0],
                           grad_x[lo:hi])


def _assert_weight_grads_accurate(got, grad, x, tile):
    """(weight, bias) gradients by F(tile x tile, 3x3) within float32 round-off of float64, on
    the scale of the sums of |grad| |x| and of |grad|."""
    shape = (grad.shape[1], x.shape[1], 3, 3)
    want_w = torch.nn.grad.conv2d_weight(x.double(), shape, grad.double(), padding=1)
    scale_w = torch.nn.grad.conv2d_weight(x.double().abs(), shape, grad.double().abs(), padding=1)
    want_b, scale_b = grad.double().sum((0, 2, 3)), grad.double().abs().sum((0, 2, 3))
    for g, want, scale in ((got[0], want_w, scale_w), (got[1], want_b, scale_b)):
        assert g.shape == want.shape and g.dtype == torch.float32
        assert ((g.double() - want).abs() <= ROUNDING[tile] * scale + 1e-7).all()


@needs_kernel
@pytest.mark.parametrize("tile", [2, 4])
# SHAPES with out channels % 8 (the weight gradient's rule), and 66 (F(2x2, 3x3)) or 22
# (F(4x4, 3x3)) blocks of 48 tiles: the kernel's float32 sums go to double every 16 blocks.
@pytest.mark.parametrize("n,c,k,h,w", [s for s in SHAPES if s[2] % 8 == 0] + [(64, 32, 32, 14, 14)])
def test_winograd_weight_grad_matches_float64(n, c, k, h, w, tile):
    gen = torch.Generator().manual_seed(h * 31 + w)
    x = torch.randn(n, c, h, w, generator=gen).contiguous(memory_format=CL)
    grad = torch.randn(n, k, h, w, generator=gen).contiguous(memory_format=CL)
    weight = torch.empty(k, c, 3, 3)
    grads = torch.ops.dvpvae.conv_cl_backward(grad, x, weight, tile, True, [False, True])[1:]
    _assert_weight_grads_accurate(grads, grad, x, tile)


@needs_kernel
def test_winograd_weight_grad_needs_a_winograd_tile():
    """The extension's 3x3 weight gradient is a Winograd form: tile 0 (oneDNN) is refused."""
    x, weight, _ = _operands(2, 16, 8, 5, 5)
    grad = torch.randn(2, 8, 5, 5).contiguous(memory_format=CL)
    with pytest.raises(RuntimeError, match="3x3 weight gradient is Winograd .* needs tile 2 or 4, got 0"):
        torch.ops.dvpvae.conv_cl_backward(grad, x, weight, 0, True, [False, True])
