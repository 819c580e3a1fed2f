"""The ResNet blocks' convolutions for the CPU fast path: channels-last, one call per gradient.

``conv_cl`` is a stride-1 convolution with a 1x1 or 3x3 (zero-padding 1) kernel:

* forward and input gradient from oneDNN. Asked for all three gradients of a 1x1
  convolution at once, ``aten.convolution_backward`` took 12-13 ms on a (250, 32, 28, 28)
  channels-last input on the 2-core CI machine; asked for the input gradient alone, 1.7 ms;
* weight and bias gradients from the extension's kernel (``csrc/conv_wgrad_cpu.cpp``)
  where that is faster than oneDNN's weight gradient plus a channel sum on this machine
  (timed on first use, ``conv_weight_grad``).

The forward and the backward are ``torch.library`` custom ops, so compiled graphs call each
as one opaque node. Tensor arguments are made channels-last in traced code, before the
ops, so that inductor writes them channels-last in the kernels that produce them (a
separate NCHW -> channels-last copy of a (250, 32, 28, 28) gradient took 15 ms), and
``needs_exact_strides`` keeps inductor from handing over other strides.
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


def _conv_backward(grad, x, weight, mask: list[bool]):
    padding = weight.shape[-1] // 2
    args = (grad, x, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1)
    return torch.ops.aten.convolution_backward(*args, mask)


def _conv_fake(x, weight, *_):
    n, _, h, w = x.shape
    return channels_last(x.new_empty((n, weight.shape[0], h, w)))


def _backward_fake(grad, x, weight, *_):
    return channels_last(torch.empty_like(x)), torch.empty_like(weight), weight.new_empty(weight.shape[0])


# ---------------------------------------------------------------- weight and bias gradients
def _extension_weight_grad_supported(grad: torch.Tensor, x: torch.Tensor) -> bool:
    from dvpvae import _ext

    return (x.device.type == "cpu" and x.dtype == grad.dtype == torch.float32
            and grad.shape[1] % 4 == 0 and x.shape[1] % 8 == 0
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and _ext.available())


def _onednn_weight_grad(grad, x, weight):
    # The bias gradient as ATen's channel sum: traced, inductor fused the sums of many
    # layers into one strided reduction kernel that was slower than a sum per gradient.
    return _conv_backward(grad, x, weight, [False, True, False])[1], grad.sum((0, 2, 3))


def _extension_weight_grad(grad, x, weight):
    return torch.ops.dvpvae.conv_weight_grad(grad, x, weight.shape[-1])


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


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(weight gradient, bias gradient) of ``F.conv2d(x, weight, bias, padding=k // 2)`` for a
    (out, in, k, k) ``weight`` with k in (1, 3), channels-last ``grad`` and ``x``.

    ``backend="auto"`` times the extension's kernel (``csrc/conv_wgrad_cpu.cpp``) against
    oneDNN on the first call for each shape and thread count, and keeps the faster
    (``weight_grad_choices()`` shows the decisions); "extension" / "onednn" force one.
    """
    if backend not in WEIGHT_GRAD_BACKENDS:
        raise ValueError(f"unknown weight-gradient backend {backend!r}; choose from {WEIGHT_GRAD_BACKENDS}")
    if weight.shape[-2:] not in ((1, 1), (3, 3)):
        raise ValueError(f"conv_weight_grad: weight must be 1x1 or 3x3, got shape {tuple(weight.shape)}")
    if backend == "auto":
        # Decided once per key, so later calls skip the support checks as well as the timing.
        key = (tuple(grad.shape), tuple(x.shape), weight.shape[-1], x.dtype, x.device.type,
               torch.get_num_threads())
        if key not in _weight_grad_choice:
            candidates = dict(extension=_extension_weight_grad, onednn=_onednn_weight_grad)
            _weight_grad_choice[key] = (_fastest(candidates, (grad, x, weight))
                                        if _extension_weight_grad_supported(grad, x) else "onednn")
        backend = _weight_grad_choice[key]
    fn = _onednn_weight_grad if backend == "onednn" else _extension_weight_grad
    return fn(grad, x, weight)


def weight_grad_choices() -> dict[tuple, str]:
    """What ``conv_weight_grad(backend="auto")`` picked, by (grad shape, input shape, kernel
    size, dtype, device type, threads)."""
    return dict(_weight_grad_choice)


# ---------------------------------------------------------------- the convolution op
def conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            weight_grad_backend: str = "auto") -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2)`` for a (out, in, k, k) weight with k in
    (1, 3); channels-last output.

    The backward takes the input gradient from oneDNN and the weight and bias gradients
    from ``conv_weight_grad(..., backend=weight_grad_backend)``.
    """
    if weight.dim() != 4 or weight.shape[-2:] not in ((1, 1), (3, 3)):
        raise ValueError(f"conv_cl: weight must be (out, in, 1, 1) or (out, in, 3, 3), got {tuple(weight.shape)}")
    return _conv_cl(channels_last(x), weight, bias, weight_grad_backend)


@torch.library.custom_op("dvpvae::conv_cl", mutates_args=(), tags=_TAGS)
def _conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             weight_grad_backend: str) -> torch.Tensor:
    # A (N, 1, H, W) input is channels-last and NCHW at once; oneDNN then returns NCHW.
    return channels_last(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2))


@torch.library.custom_op("dvpvae::conv_cl_backward", mutates_args=(), tags=_TAGS)
def conv_cl_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input_grad: bool,
                     weight_grad_backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of ``conv_cl`` for channels-last grad and x; grad_x is
    zeros unless ``need_input_grad``."""
    grad_w, grad_b = conv_weight_grad(grad, x, weight, weight_grad_backend)
    grad_x = (channels_last(_conv_backward(grad, x, weight, [True, False, False])[0]) if need_input_grad
              else torch.zeros_like(x))
    return grad_x, grad_w.contiguous(), grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, weight_grad_backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.weight_grad_backend = bias is not None, weight_grad_backend


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = conv_cl_backward(channels_last(grad), x, weight, ctx.needs_input_grad[0],
                                              ctx.weight_grad_backend)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w, (grad_b if ctx.has_bias else None), None


_conv_cl.register_fake(_conv_fake)
conv_cl_backward.register_fake(_backward_fake)
_conv_cl.register_autograd(_backward, setup_context=_setup_context)
