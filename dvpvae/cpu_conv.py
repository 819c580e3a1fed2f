"""The ResNet blocks' convolutions for the CPU fast path: channels-last, one call per gradient.

* 1x1: ``aten.convolution_backward`` asked for all three gradients of a 1x1 convolution
  took 12-13 ms on a (250, 32, 28, 28) channels-last input on the 2-core CI machine; asked
  for the input gradient and the weight gradient separately, 1.7 + 2.0 ms.
* 3x3 (stride 1, padding 1): the input gradient comes from oneDNN, the weight gradient
  from the extension's kernel (``csrc/conv_wgrad_cpu.cpp``) where that is faster than
  oneDNN on this machine (timed on first use, ``conv3x3_weight_grad``).

Both are ``torch.library`` custom ops, so compiled graphs call each as one opaque node.
Tensor arguments are made channels-last in traced code, before the ops, so that inductor
writes them channels-last in the kernels that produce them (a separate NCHW ->
channels-last copy of a (250, 32, 28, 28) gradient took 15 ms), and ``needs_exact_strides``
keeps inductor from handing over other strides.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

_CL = torch.channels_last
_TAGS = (torch.Tag.needs_exact_strides,)
WEIGHT_GRAD_BACKENDS = ("auto", "extension", "onednn")
_weight_grad_choice: dict[tuple, str] = {}


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory format (no copy when it already is)."""
    return t.contiguous(memory_format=_CL)


def _conv_backward(grad, x, weight, padding: int, mask: list[bool]):
    args = (grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1)
    return torch.ops.aten.convolution_backward(*args, mask)


def _input_grad(grad, x, weight, padding: int, needed: bool) -> torch.Tensor:
    if not needed:
        return torch.zeros_like(x)
    return channels_last(_conv_backward(grad, x, weight, padding, [True, False, False])[0])


def _conv_fake(x, weight, *_):
    n, _, h, w = x.shape
    return channels_last(x.new_empty((n, weight.shape[0], h, w)))


def _backward_fake(grad, x, weight, *_):
    return channels_last(torch.empty_like(x)), torch.empty_like(weight), weight.new_empty(weight.shape[0])


def _bias_grad(grad: torch.Tensor) -> torch.Tensor:
    # Inside the op: traced, inductor fused the channel sums of many layers into one
    # strided reduction kernel that was slower than ATen's sum on each gradient.
    return grad.sum((0, 2, 3))


def _register_autograd(op, backward_op) -> None:
    """Autograd of ``op(x, weight, bias, *options)`` through ``backward_op(grad, x, weight,
    need_input_grad, *options) -> (grad_x, grad_weight, grad_bias)``."""
    def setup_context(ctx, inputs, output):
        x, weight, bias, *options = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.options = bias is not None, options

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = backward_op(channels_last(grad), x, weight, ctx.needs_input_grad[0], *ctx.options)
        return ((grad_x if ctx.needs_input_grad[0] else None), grad_w, (grad_b if ctx.has_bias else None),
                *[None] * len(ctx.options))

    op.register_autograd(backward, setup_context=setup_context)


# ---------------------------------------------------------------- 1x1 convolution
def conv1x1_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a (out, in, 1, 1) weight; channels-last output."""
    return _conv1x1_cl(channels_last(x), weight, bias)


@torch.library.custom_op("dvpvae::conv1x1_cl", mutates_args=(), tags=_TAGS)
def _conv1x1_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # A (N, 1, H, W) input is channels-last and NCHW at once; oneDNN then returns NCHW.
    return channels_last(F.conv2d(x, weight, bias))


@torch.library.custom_op("dvpvae::conv1x1_cl_backward", mutates_args=(), tags=_TAGS)
def conv1x1_cl_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        need_input_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) for channels-last grad and x; grad_x is zeros unless
    ``need_input_grad``."""
    grad_w = _conv_backward(grad, x, weight, 0, [False, True, False])[1].contiguous()
    return _input_grad(grad, x, weight, 0, need_input_grad), grad_w, _bias_grad(grad)


# ---------------------------------------------------------------- 3x3 convolution
def _extension_weight_grad_supported(grad: torch.Tensor, x: torch.Tensor) -> bool:
    from dvpvae import _ext

    return (x.device.type == "cpu" and x.dtype == grad.dtype == torch.float32
            and grad.shape[1] % 4 == 0 and x.shape[1] % 8 == 0
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and _ext.available())


def _onednn_weight_grad(grad, x, weight):
    return _conv_backward(grad, x, weight, 1, [False, True, False])[1]


def _extension_weight_grad(grad, x, weight):
    return torch.ops.dvpvae.conv3x3_weight_grad(grad, x)


def _fastest(candidates: dict, args) -> str:
    def best_of_three(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
        return min(times)
    timings = {name: best_of_three(fn) for name, fn in candidates.items()}
    return min(timings, key=timings.get)


def conv3x3_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        backend: str = "auto") -> torch.Tensor:
    """Weight gradient of ``F.conv2d(x, weight, padding=1)`` for channels-last ``grad``, ``x``.

    ``backend="auto"`` times the extension's kernel (``csrc/conv_wgrad_cpu.cpp``) against
    oneDNN on the first call for each shape and thread count, and keeps the faster
    (``weight_grad_choices()`` shows the decisions); "extension" / "onednn" force one.
    """
    if backend not in WEIGHT_GRAD_BACKENDS:
        raise ValueError(f"unknown weight-gradient backend {backend!r}; choose from {WEIGHT_GRAD_BACKENDS}")
    if backend == "auto":
        # Decided once per key, so later calls skip the support checks as well as the timing.
        key = (tuple(grad.shape), tuple(x.shape), x.dtype, x.device.type, torch.get_num_threads())
        if key not in _weight_grad_choice:
            candidates = dict(extension=_extension_weight_grad, onednn=_onednn_weight_grad)
            _weight_grad_choice[key] = (_fastest(candidates, (grad, x, weight))
                                        if _extension_weight_grad_supported(grad, x) else "onednn")
        backend = _weight_grad_choice[key]
    fn = _onednn_weight_grad if backend == "onednn" else _extension_weight_grad
    return fn(grad, x, weight)


def weight_grad_choices() -> dict[tuple, str]:
    """What ``conv3x3_weight_grad(backend="auto")`` picked, by (grad shape, input shape, dtype,
    device type, threads)."""
    return dict(_weight_grad_choice)


def conv3x3_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               weight_grad_backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a (out, in, 3, 3) weight; channels-last output.

    The backward takes the input gradient from oneDNN and the weight gradient from
    ``conv3x3_weight_grad(..., backend=weight_grad_backend)``.
    """
    return _conv3x3_cl(channels_last(x), weight, bias, weight_grad_backend)


@torch.library.custom_op("dvpvae::conv3x3_cl", mutates_args=(), tags=_TAGS)
def _conv3x3_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_grad_backend: str) -> torch.Tensor:
    return channels_last(F.conv2d(x, weight, bias, padding=1))


@torch.library.custom_op("dvpvae::conv3x3_cl_backward", mutates_args=(), tags=_TAGS)
def conv3x3_cl_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input_grad: bool,
                        weight_grad_backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) for channels-last grad and x; grad_x is zeros unless
    ``need_input_grad``."""
    grad_w = conv3x3_weight_grad(grad, x, weight, weight_grad_backend).contiguous()
    return _input_grad(grad, x, weight, 1, need_input_grad), grad_w, _bias_grad(grad)


for _op, _backward_op in ((_conv1x1_cl, conv1x1_cl_backward), (_conv3x3_cl, conv3x3_cl_backward)):
    _op.register_fake(_conv_fake)
    _backward_op.register_fake(_backward_fake)
    _register_autograd(_op, _backward_op)
