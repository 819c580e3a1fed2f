"""conv1x1_residual: skip + gate * conv1x1(h), Triton kernels (interpreter) vs the reference.

Three-way check of the output and of every gradient (h, weight, bias, skip and, for a
tensor gate, the gate); atol scaled by the tensor's magnitude (weight/bias/gate gradients
are sums over N*H*W terms).
"""
import pytest
import torch

from dvpvae.kernels.conv1x1_residual import (conv1x1_residual, conv1x1_residual_bwd,
                                             conv1x1_residual_fwd, conv1x1_residual_ref)
from tests.kernels.utils import assert_three_way, assert_verbose_allclose

DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-12)]

# (N, Cin, Cout, H, W): closing convs of the preset blocks (MNIST 32->32 at 14x14 / 7x7,
# OMNIGLOT 40->80, decoder prior 32 -> 2w+ch = 34, skip conv 33->32, CIFAR10 96->128 at
# 32x32 batch 1), then odd/prime sizes.
SHAPES = [
    (2, 32, 32, 14, 14),
    (2, 32, 32, 7, 7),
    (2, 40, 80, 7, 7),
    (2, 32, 34, 7, 7),
    (2, 33, 32, 7, 7),
    (1, 96, 128, 32, 32),
    (3, 5, 7, 3, 5),
    (1, 17, 13, 11, 13),
]


def _inputs(n, cin, cout, h, w, dtype, bias=True):
    h_ = torch.randn(n, cin, h, w, dtype=torch.float64)
    wt = torch.randn(cout, cin, 1, 1, dtype=torch.float64) / cin ** 0.5
    b = torch.randn(cout, dtype=torch.float64) * 0.5 if bias else None
    skip = torch.randn(n, cout, h, w, dtype=torch.float64)
    return [t.to(dtype) if t is not None else None for t in (h_, wt, b, skip)]


def _run(fn, tensors, gate, grad):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in tensors]
    if isinstance(gate, torch.Tensor):
        gate = gate.detach().clone().requires_grad_(True)
    out = fn(*leaves, gate)
    out.backward(grad)
    grads = [t.grad if t is not None else None for t in leaves]
    grads.append(gate.grad if isinstance(gate, torch.Tensor) else None)
    return out.detach(), grads


def _check(shape, dtype, atol, gate, bias=True):
    n, cin, cout, h, w = shape
    tensors = _inputs(n, cin, cout, h, w, dtype, bias)
    grad = torch.randn(n, cout, h, w, dtype=dtype)
    g = gate.to(dtype) if isinstance(gate, torch.Tensor) else gate
    out, gs = _run(conv1x1_residual, tensors, g, grad)
    out_ref, gs_ref = _run(conv1x1_residual_ref, tensors, g, grad)
    hi = [t.double() if t is not None else None for t in tensors]
    g_hi = gate.double() if isinstance(gate, torch.Tensor) else gate
    out_hi, gs_hi = _run(conv1x1_residual_ref, hi, g_hi, grad.double())
    assert out.shape == (n, cout, h, w) and out.dtype == dtype
    names = ("out", "grad_h", "grad_weight", "grad_bias", "grad_skip", "grad_gate")
    for name, a, r, e in zip(names, [out] + gs, [out_ref] + gs_ref, [out_hi] + gs_hi):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, name
        assert_three_way(a, r, e, atol * max(1.0, e.abs().max().item()), name=name)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_float_gate(shape, dtype, atol):
    _check(shape, dtype, atol, 0.7)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[-1]])
@pytest.mark.parametrize("gate_shape", [(), (1,)])
def test_tensor_gate_gets_gradient(shape, gate_shape, dtype, atol):
    _check(shape, dtype, atol, torch.full(gate_shape, 0.3, dtype=torch.float64))


def test_no_bias_and_unit_gate():
    _check((2, 32, 34, 7, 7), torch.float32, 1e-5, 1.0, bias=False)
    _check((2, 32, 34, 7, 7), torch.float64, 1e-12, torch.tensor(1.0), bias=False)


def test_multi_tile_launch():
    """16-wide tiles: several programs per axis, multi-step reductions, ragged edges."""
    h, wt, b, skip = _inputs(2, 33, 34, 7, 5, torch.float64)
    gate = torch.full((1,), 0.6, dtype=torch.float64)
    blocks = (16, 16, 16)
    out = conv1x1_residual_fwd(h, wt, b, skip, gate, blocks=blocks)
    assert_verbose_allclose(out, conv1x1_residual_ref(h, wt, b, skip, gate), atol=1e-12, rtol=0)
    g = torch.randn_like(out)
    gh, gw, gb, gg = conv1x1_residual_bwd(g, h, wt, b, gate, need_gate=True, blocks=blocks)
    leaves = [t.clone().requires_grad_(True) for t in (h, wt, b, gate)]
    conv1x1_residual_ref(leaves[0], leaves[1], leaves[2], skip, leaves[3]).backward(g)
    for name, a, e in zip(("grad_h", "grad_weight", "grad_bias", "grad_gate"),
                          (gh, gw, gb, gg), leaves):
        assert_verbose_allclose(a, e.grad, atol=1e-12, rtol=0, name=name)


def test_strided_inputs():
    h, wt, b, skip = _inputs(2, 32, 34, 7, 7, torch.float64)
    h = h.to(memory_format=torch.channels_last)
    skip = skip.transpose(2, 3).contiguous().transpose(2, 3)
    grad = torch.randn(2, 7, 7, 34, dtype=torch.float64).permute(0, 3, 1, 2)
    out, gs = _run(conv1x1_residual, [h, wt, b, skip], 0.5, grad)
    out_ref, gs_ref = _run(conv1x1_residual_ref, [h, wt, b, skip], 0.5, grad)
    assert_verbose_allclose(out, out_ref, atol=1e-12, rtol=0, name="out")
    for a, e in zip(gs[:4], gs_ref[:4]):
        assert_verbose_allclose(a, e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("op", [conv1x1_residual, conv1x1_residual_ref],
                         ids=["triton", "reference"])
def test_bad_inputs_raise(op):
    h, wt, b, skip = _inputs(1, 4, 6, 3, 3, torch.float32)
    cases = [
        lambda: op(h[0], wt, b, skip, 1.0),
        lambda: op(h, torch.zeros(6, 4, 3, 3), b, skip, 1.0),
        lambda: op(h, wt, b, skip[:, :5], 1.0),     # skip shape
        lambda: op(h, wt, b, skip.double(), 1.0),   # skip dtype
        lambda: op(h, wt, b, skip, torch.ones(2)),  # gate
        lambda: op(h, wt, b, skip, "1"),
        lambda: op(h, wt, torch.zeros(6, 1), skip, 1.0),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()


def test_triton_rejects_half():
    h, wt, b, skip = _inputs(1, 4, 6, 3, 3, torch.float16)
    with pytest.raises(ValueError, match="float32/float64"):
        conv1x1_residual(h, wt, b, skip, 1.0)
