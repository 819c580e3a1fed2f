"""The fused kernels as torch.library triton ops: registration, ``torch.library.opcheck`` of
every op, and the public functions traced by torch.compile(fullgraph=True).

Everything runs on CPU tensors in the Triton interpreter, where each op stays one opaque node
through functionalization (``kernels/_triton.py``, ``kernel_op``); the GPU path, where AOTAutograd
decomposes the ops into their kernel launches, is traced in ``tests/test_triton_trace.py``.
"""
import functools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from dvpvae.kernels import triton_runs_on
from dvpvae.kernels._triton import NAMESPACE
from dvpvae.kernels.conv1x1_act import (conv1x1_act, conv1x1_act_op, conv1x1_input_grad_op,
                                        conv1x1_weight_grad_op)
from dvpvae.kernels.conv1x1_residual import conv1x1_residual, conv1x1_residual_op
from dvpvae.kernels.dct_pseudoinput import (dct_basis, dct_pseudoinput, dct_pseudoinput_bwd_op,
                                            dct_pseudoinput_op, idct_pseudoinput,
                                            idct_pseudoinput_bwd_op, idct_pseudoinput_op)
from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step, ddpm_step_bwd_op, ddpm_step_op
from dvpvae.kernels.reparam_kl import (reparam_kl, reparam_kl_bwd_op, reparam_kl_op,
                                       reparam_sample, reparam_sample_bwd_op, reparam_sample_op)

pytestmark = pytest.mark.skipif(not triton_runs_on("cpu"),
                                reason="needs TRITON_INTERPRET=1 set before triton is imported")

FORWARD_OPS = ("conv1x1_act", "conv1x1_residual", "dct_pseudoinput", "idct_pseudoinput",
               "reparam_kl", "reparam_sample", "ddpm_step")
BACKWARD_OPS = ("conv1x1_input_grad", "conv1x1_weight_grad", "dct_pseudoinput_bwd",
                "idct_pseudoinput_bwd", "reparam_kl_bwd", "reparam_sample_bwd", "ddpm_step_bwd")

# opcheck's sub-tests: schema (no mutation or aliasing), autograd registration, the fake
# kernel against the real one, and AOTAutograd (static and dynamic shapes) against eager,
# forward outputs and gradients.
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_static", "test_aot_dispatch_dynamic")


def test_every_fused_op_is_a_registered_triton_op():
    ns = getattr(torch.ops, NAMESPACE)
    registered = {name for name in dir(ns)
                  if isinstance(getattr(ns, name), torch._ops.OpOverloadPacket)}
    assert NAMESPACE != "dvpvae"  # the C++ extension's namespace
    assert registered == set(FORWARD_OPS + BACKWARD_OPS)
    for name in registered:
        assert f"{NAMESPACE}::{name}" in torch._library.triton.triton_ops_to_kernels
    for op in (conv1x1_act_op, conv1x1_residual_op, dct_pseudoinput_op, idct_pseudoinput_op,
               reparam_kl_op, reparam_sample_op, ddpm_step_op):
        assert op._backward_fn is not None, op._qualname


# ----------------------------------------------------------------------------- opcheck

def _req(*shape, dtype=torch.float32, lo=None, hi=None):
    if lo is None:
        return torch.randn(*shape, dtype=dtype).requires_grad_()
    return torch.empty(*shape, dtype=dtype).uniform_(lo, hi).requires_grad_()


def _cases():
    """(op, args) per case; forward ops get inputs that require grad (so opcheck also checks
    their registered backward), backward ops plain tensors (no double backward)."""
    f64 = torch.float64
    x, w, b = _req(2, 5, 6, 7), _req(3, 5, 1, 1), _req(3)
    gy, z = torch.randn(2, 3, 6, 7), torch.randn(2, 3, 6, 7)
    scale = torch.rand(3, 4, 4) + 1.0
    img, u = _req(2, 3, 8, 8, lo=-1.0, hi=1.0), _req(2, 3, 4, 4, lo=-1.0, hi=1.0)
    lat = [_req(3, 1, 7, 7) for _ in range(5)]
    lat[1].data.uniform_(-4.0, 2.0)
    lat[3].data.uniform_(-4.0, 2.0)
    plain = [t.detach() for t in lat]
    coef = ddpm_coefficients(10, -6.0, 7.0)
    return {
        "conv1x1_act-silu": (conv1x1_act_op, (x, w, b, "silu", True)),
        "conv1x1_act-gelu-f64": (conv1x1_act_op, (_req(1, 4, 3, 5, dtype=f64),
                                                  _req(6, 4, 1, 1, dtype=f64), None, "gelu", True)),
        "conv1x1_act-none-no_z": (conv1x1_act_op, (x, w, None, "none", False)),
        "conv1x1_input_grad-elu": (conv1x1_input_grad_op, (gy, w.detach(), z, None, "elu")),
        "conv1x1_input_grad-scale": (conv1x1_input_grad_op,
                                     (gy, w.detach(), None, torch.tensor([0.3]), "none")),
        "conv1x1_weight_grad-relu": (conv1x1_weight_grad_op, (gy, x.detach(), z, "relu", True)),
        "conv1x1_residual": (conv1x1_residual_op, (x, w, b, _req(2, 3, 6, 7), _req(1))),
        "dct_pseudoinput": (dct_pseudoinput_op, (img, scale, 4, True)),
        "dct_pseudoinput_bwd": (dct_pseudoinput_bwd_op, (torch.randn(2, 3, 4, 4),
                                                         torch.randn(2, 3, 4, 4) * 2, scale, 8, 8)),
        "idct_pseudoinput": (idct_pseudoinput_op, (u, scale, 8, 9)),
        "idct_pseudoinput_bwd": (idct_pseudoinput_bwd_op,
                                 (torch.randn(2, 3, 8, 9), u.detach(), scale, 8, 9)),
        "reparam_kl": (reparam_kl_op, (*lat, -3.0)),
        "reparam_kl_bwd": (reparam_kl_bwd_op, (*plain, torch.randn(3, 1, 7, 7), torch.randn(3),
                                               -3.0, True)),
        "reparam_kl_bwd-kl_only": (reparam_kl_bwd_op, (*plain, None, torch.randn(3), -3.0, False)),
        "reparam_sample": (reparam_sample_op, (*lat[2:5], -3.0, 0.5)),
        "reparam_sample_bwd": (reparam_sample_bwd_op, (plain[3], plain[4], torch.randn(3, 1, 7, 7),
                                                       -3.0, 0.5, True)),
        "ddpm_step-int_step": (ddpm_step_op, (*lat[:3], coef, None, 4, 0.8)),
        "ddpm_step-tensor_step": (ddpm_step_op, (*lat[:3], coef, torch.tensor(7), 0, 1.0)),
        "ddpm_step_bwd": (ddpm_step_bwd_op, (*plain[:3], coef, None, 4, 0.8, True)),
    }


CASES = sorted(_cases())


@pytest.mark.parametrize("case", CASES)
def test_opcheck(case):
    op, args = _cases()[case]
    torch.library.opcheck(op, args, test_utils=OPCHECK_UTILS)


def _strided(a):
    """The same values in a non-contiguous layout (the last two dims swapped in memory)."""
    if not isinstance(a, torch.Tensor) or a.dim() < 2 or min(a.shape[-2:]) < 2:
        return a
    t = a.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not t.is_contiguous()
    return t


@pytest.mark.parametrize("case", CASES)
def test_ops_take_any_strides(case):
    """A compiler may hand an op (saved) tensors in another layout: same numbers."""
    op, args = _cases()[case]
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, out_strided = op(*plain), op(*[_strided(a) for a in plain])
    for a, b in zip(*((o,) if isinstance(o, torch.Tensor) else o for o in (out, out_strided))):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_opcheck_covers_every_op():
    covered = {op._name for op, _ in _cases().values()}
    assert covered == set(FORWARD_OPS + BACKWARD_OPS)


# ----------------------------------------------------------------------------- fake kernels

def test_fake_kernels_launch_nothing_and_leave_the_basis_cache_real():
    """Under fake tensors the interpreted launches are skipped (no host memory to run on),
    and the DCT bases built while tracing stay out of dct_basis' cache."""
    dct_basis.cache_clear()
    with FakeTensorMode():
        x = torch.empty(2, 3, 8, 8, requires_grad=True)
        u = dct_pseudoinput(x, torch.ones(3, 4, 4), 4)
        u.sum().backward()
        assert u.shape == (2, 3, 4, 4) and x.grad.shape == x.shape
    gm = make_fx(lambda img, s: idct_pseudoinput(dct_pseudoinput(img, s, 4), s, (8, 8)),
                 tracing_mode="fake")(torch.rand(2, 3, 8, 8), torch.ones(3, 4, 4))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {f"{NAMESPACE}.dct_pseudoinput.default",
            f"{NAMESPACE}.idct_pseudoinput.default"} <= targets
    assert dct_basis.cache_info().currsize == 0
    dct_basis(8, 4, torch.float32, torch.device("cpu"))
    assert dct_basis.cache_info().currsize == 1


def test_backward_without_the_saved_intermediate_raises():
    x, w = _req(1, 2, 3, 3), _req(4, 2, 1, 1)
    y, _ = conv1x1_act_op(x, w, None, "silu", False)
    with pytest.raises(RuntimeError, match="did not store"):
        y.sum().backward()
    img = _req(1, 2, 8, 8, lo=-1.0, hi=1.0)
    u, _ = dct_pseudoinput_op(img, torch.ones(2, 3, 3), 3, False)
    with pytest.raises(RuntimeError, match="did not store"):
        u.sum().backward()


def test_intermediate_outputs_take_no_gradient():
    x, w = _req(1, 2, 3, 3), _req(4, 2, 1, 1)
    y, z = conv1x1_act_op(x, w, None, "silu", True)
    assert y.requires_grad and not z.requires_grad
    u, v = dct_pseudoinput_op(_req(1, 2, 8, 8, lo=-1.0, hi=1.0), torch.ones(2, 3, 3), 3, True)
    assert u.requires_grad and not v.requires_grad


def test_no_grad_stores_no_intermediate():
    x, w = _req(1, 2, 3, 3), _req(4, 2, 1, 1)
    with torch.no_grad():
        assert conv1x1_act_op(x, w, None, "silu", torch.is_grad_enabled())[1].numel() == 0
    with torch.no_grad():  # the public function passes the same flag
        y = conv1x1_act(x, w, None, "silu")
    assert not y.requires_grad


# ----------------------------------------------------------------------------- torch.compile

def _public_calls():
    """(function, differentiable args, other args) for every public Triton function."""
    coef = ddpm_coefficients(10, -6.0, 7.0)
    lat = [torch.randn(3, 1, 7, 7) for _ in range(5)]
    lat[1].uniform_(-4.0, 2.0)
    lat[3].uniform_(-4.0, 2.0)
    return {
        "conv1x1_act": (conv1x1_act, [torch.randn(2, 5, 6, 7), torch.randn(3, 5, 1, 1),
                                      torch.randn(3)], ("gelu",)),
        "conv1x1_residual": (conv1x1_residual, [torch.randn(2, 5, 6, 7), torch.randn(3, 5, 1, 1),
                                                torch.randn(3), torch.randn(2, 3, 6, 7),
                                                torch.tensor(0.7)], ()),
        "conv1x1_residual-float_gate": (functools.partial(conv1x1_residual, gate=0.3),
                                        [torch.randn(2, 5, 6, 7), torch.randn(3, 5, 1, 1), None,
                                         torch.randn(2, 3, 6, 7)], ()),
        "dct_pseudoinput": (dct_pseudoinput, [torch.rand(2, 3, 8, 8) * 2 - 1],
                            (torch.rand(3, 4, 4) + 1.0, 4)),
        "idct_pseudoinput": (idct_pseudoinput, [torch.rand(2, 3, 4, 4) * 2 - 1],
                             (torch.rand(3, 4, 4) + 1.0, (8, 9))),
        "reparam_kl": (reparam_kl, lat, (-3.0,)),
        "reparam_sample": (reparam_sample, lat[2:5], (-3.0, 0.5)),
        "ddpm_step-int_step": (ddpm_step, lat[:3], (coef, 4, 0.8)),
        "ddpm_step-tensor_step": (ddpm_step, lat[:3], (coef, torch.tensor(4), 0.8)),
    }


@pytest.mark.parametrize("case", sorted(_public_calls()))
def test_public_function_compiles_fullgraph_with_the_same_numbers(case):
    """torch.compile(backend="aot_eager", fullgraph=True) traces the public function and its
    backward without a graph break and computes the eager numbers exactly."""
    fn, diff, rest = _public_calls()[case]
    eager_in = [t.clone().requires_grad_() if t is not None else None for t in diff]
    out = fn(*eager_in, *rest)
    torch._dynamo.reset()
    compiled_in = [t.clone().requires_grad_() if t is not None else None for t in diff]
    out_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(*compiled_in, *rest)
    outs, outs_c = (out, out_c) if isinstance(out, tuple) else ((out,), (out_c,))
    for a, b in zip(outs, outs_c):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    weights = [torch.randn_like(o) for o in outs]
    sum(((o * g).sum() for o, g in zip(outs, weights))).backward()
    sum(((o * g).sum() for o, g in zip(outs_c, weights))).backward()
    for a, b in zip(eager_in, compiled_in):
        if a is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0)
