"""conv1x1_act: Triton kernels (interpreter) vs the reference, forward and all gradients.

Three-way check per tensor: kernel and same-dtype reference vs the fp64 reference; atol is
scaled by the tensor's magnitude because grad_weight/grad_bias are sums over N*H*W terms.
"""
import pytest
import torch

from dvpvae.kernels.conv1x1_act import (ACTIVATIONS, apply_activation, conv1x1_act,
                                        conv1x1_act_bwd, conv1x1_act_fwd, conv1x1_act_ref)
from tests.kernels.utils import assert_three_way, assert_verbose_allclose

DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-12)]

# (N, Cin, Cout, H, W): preset shapes first (MNIST stem 1->32 at 28x28 and blocks 32->32 at
# 14x14 / 7x7; OMNIGLOT bottleneck 80->40 / 40->80; decoder prior input 33 -> 32 and
# 32 -> 2w+ch = 34; CIFAR10 bottleneck 128->96 and stem 3->128 at 32x32, batch 1 to keep
# the interpreter launch small), then odd/prime sizes.
SHAPES = [
    (1, 1, 32, 28, 28),
    (2, 32, 32, 14, 14),
    (2, 32, 32, 7, 7),
    (2, 80, 40, 14, 14),
    (2, 40, 80, 7, 7),
    (2, 33, 32, 7, 7),
    (2, 32, 34, 7, 7),
    (1, 128, 96, 32, 32),
    (1, 3, 128, 32, 32),
    (3, 5, 7, 3, 5),
    (1, 17, 13, 11, 13),
]


def _inputs(n, cin, cout, h, w, dtype, bias=True):
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    wt = torch.randn(cout, cin, 1, 1, dtype=torch.float64) / cin ** 0.5
    b = torch.randn(cout, dtype=torch.float64) * 0.5 if bias else None
    return [t.to(dtype) if t is not None else None for t in (x, wt, b)]


def _run(fn, tensors, grad, *args, **kw):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in tensors]
    out = fn(*leaves, *args, **kw)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def _check(shape, dtype, atol, activation, bias=True):
    n, cin, cout, h, w = shape
    tensors = _inputs(n, cin, cout, h, w, dtype, bias)
    grad = torch.randn(n, cout, h, w, dtype=dtype)
    y, gs = _run(conv1x1_act, tensors, grad, activation)
    y_ref, gs_ref = _run(conv1x1_act_ref, tensors, grad, activation)
    hi = [t.double() if t is not None else None for t in tensors]
    y_hi, gs_hi = _run(conv1x1_act_ref, hi, grad.double(), activation)
    assert y.shape == (n, cout, h, w) and y.dtype == dtype
    for name, a, r, e in zip(("y", "grad_x", "grad_weight", "grad_bias"),
                             [y] + gs, [y_ref] + gs_ref, [y_hi] + gs_hi):
        if e is None:
            assert a is None, name
            continue
        assert_three_way(a, r, e, atol * max(1.0, e.abs().max().item()), name=name)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_shapes(shape, dtype, atol):
    _check(shape, dtype, atol, "silu")


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(2, 33, 32, 7, 7), (1, 17, 13, 11, 13)])
def test_activations(shape, activation, dtype, atol):
    _check(shape, dtype, atol, activation)


@pytest.mark.parametrize("activation", ["gelu", "none"])
def test_no_bias(activation):
    _check((2, 32, 34, 7, 7), torch.float32, 1e-5, activation, bias=False)


@pytest.mark.parametrize("activation", ["silu", "relu"])
def test_multi_tile_launch(activation):
    """16-wide tiles force several programs per axis, a multi-step reduction loop and
    ragged edges in every dimension (the GPU tile sizes, smaller than the interpreter's)."""
    n, cin, cout, h, w = 2, 33, 34, 7, 5
    x, wt, b = _inputs(n, cin, cout, h, w, torch.float64)
    blocks = (16, 16, 16)
    y, z = conv1x1_act_fwd(x, wt, b, activation, blocks=blocks)
    assert_verbose_allclose(y, conv1x1_act_ref(x, wt, b, activation), atol=1e-12, rtol=0)
    g = torch.randn_like(y)
    gx, gw, gb = conv1x1_act_bwd(g, x, wt, z, activation, has_bias=True, blocks=blocks)
    leaves = [t.clone().requires_grad_(True) for t in (x, wt, b)]
    conv1x1_act_ref(*leaves, activation).backward(g)
    for name, a, e in zip(("grad_x", "grad_weight", "grad_bias"), (gx, gw, gb), leaves):
        assert_verbose_allclose(a, e.grad, atol=1e-12, rtol=0, name=name)


def test_strided_inputs():
    """channels-last x and a non-contiguous incoming gradient are read through strides."""
    x, wt, b = _inputs(2, 32, 34, 7, 7, torch.float64)
    x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(2, 7, 7, 34, dtype=torch.float64).permute(0, 3, 1, 2)
    y, gs = _run(conv1x1_act, [x, wt, b], grad, "gelu")
    y_ref, gs_ref = _run(conv1x1_act_ref, [x, wt, b], grad, "gelu")
    assert_verbose_allclose(y, y_ref, atol=1e-12, rtol=0, name="y")
    for a, e in zip(gs, gs_ref):
        assert_verbose_allclose(a, e, atol=1e-12, rtol=0)


def test_inference_skips_preactivation_and_partial_grads():
    x, wt, b = _inputs(1, 8, 16, 4, 4, torch.float32)
    y, z = conv1x1_act_fwd(x, wt, b, "silu", store_z=False)
    assert z is None
    assert_verbose_allclose(y, conv1x1_act_ref(x, wt, b, "silu"))
    # Only the weight requires grad: grad_x kernel is skipped, result still right.
    wl = wt.clone().requires_grad_(True)
    conv1x1_act(x, wl, b, "silu").sum().backward()
    wr = wt.clone().requires_grad_(True)
    conv1x1_act_ref(x, wr, b, "silu").sum().backward()
    assert_verbose_allclose(wl.grad, wr.grad, atol=1e-4)


@pytest.mark.parametrize("op", [conv1x1_act, conv1x1_act_ref], ids=["triton", "reference"])
def test_bad_inputs_raise(op):
    x, wt, b = _inputs(1, 4, 6, 3, 3, torch.float32)
    cases = [
        lambda: op(x[0], wt, b),                       # 3-D x
        lambda: op(x, wt.view(6, 4), b),               # 2-D weight
        lambda: op(x, torch.zeros(6, 4, 3, 3), b),     # 3x3 weight
        lambda: op(x, torch.zeros(6, 5, 1, 1), b),     # Cin
        lambda: op(x, wt, torch.zeros(5)),             # bias
        lambda: op(x, wt.double(), b),                 # dtype
        lambda: op(x, wt, b, "tanh"),                  # activation
        lambda: op(x.long(), wt, b),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


def test_triton_rejects_half():
    x, wt, b = _inputs(1, 4, 6, 3, 3, torch.float16)
    with pytest.raises(ValueError, match="float32/float64"):
        conv1x1_act(x, wt, b)


@pytest.mark.parametrize("name,module", [("relu", torch.nn.ReLU()), ("silu", torch.nn.SiLU()),
                                         ("elu", torch.nn.ELU()), ("gelu", torch.nn.GELU()),
                                         ("none", torch.nn.Identity())])
def test_apply_activation_matches_modules(name, module):
    z = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert name in ACTIVATIONS
    assert torch.equal(apply_activation(z, name), module(z))


def test_apply_activation_rejects_unknown_name():
    with pytest.raises(ValueError, match="activation must be one of"):
        apply_activation(torch.zeros(2), "tanh")
