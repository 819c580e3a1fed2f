"""The ResNet blocks' convolutions for the CPU provider: channels-last, one call per gradient.

``conv_cl`` is a stride-1 convolution with a 1x1 or 3x3 (zero-padding 1) kernel. On AVX2
CPUs the extension's kernels serve wherever they cover the shape: a 3x3 convolution's
forward and input gradient by Winograd F(4x4, 3x3) or F(2x2, 3x3) (``winograd_tile``; 2.25
or 4 multiplies per output instead of 9), its weight gradient by F(2x2, 3x3)
(``csrc/conv_winograd_cpu.cpp``), and a 1x1 convolution's weight and bias gradients
(``csrc/conv_wgrad_cpu.cpp``, faster than oneDNN's weight gradient plus a channel sum).
Everything else, and everything on AVX-512 CPUs (the extension's kernels are 8-lane AVX2
code), comes from oneDNN. The choice is a rule on shape, dtype and ISA (``_extension_isa``),
so every process computes the same numbers. Both directions are ``torch.library`` custom
ops: compiled graphs call each as one node, and ``needs_exact_strides`` keeps inductor from
handing them other strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CL = torch.channels_last
_TAGS = (torch.Tag.needs_exact_strides,)


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


def _extension_isa() -> bool:
    """An AVX2-class CPU (the ISA the extension's convolution kernels beat oneDNN on) and the
    extension built."""
    from dvpvae import _ext

    return torch.backends.cpu.get_cpu_capability() == "AVX2" and _ext.available()


# ---------------------------------------------------------------- 3x3 forward and input gradient
def winograd_covers(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the extension's Winograd kernel computes ``F.conv2d(x, weight, padding=1)`` here:
    a float32 CPU 3x3 convolution with in and out channels % 8 on an AVX2-class CPU."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape[-2:] == (3, 3) and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and _extension_isa())


def winograd_tile(height: int, width: int) -> int:
    """Output tile side of the Winograd form for an image of this size: 4 (F(4x4, 3x3), 36
    transformed points per 4x4 tile) where that covers the image with fewer points than 2
    (F(2x2, 3x3), 16 per 2x2 tile), partial edge tiles counted whole."""
    def points(m):
        return -(-height // m) * -(-width // m) * (m + 2) ** 2
    return 4 if points(4) < points(2) else 2


def winograd_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` by the extension's Winograd kernel (channels-last,
    ``winograd_covers`` must hold)."""
    return torch.ops.dvpvae.conv3x3_winograd(channels_last(x), weight, bias, winograd_tile(*x.shape[-2:]))


def conv_input_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    use_extension: bool = True) -> torch.Tensor:
    """Input gradient (channels-last) of ``F.conv2d(x, weight, padding=k // 2)`` for a 1x1 or
    3x3 ``weight``: from the extension's Winograd kernel where ``use_extension`` and
    ``winograd_covers``, else from oneDNN."""
    if weight.shape[-1] == 3:
        # A stride-1 'same' 3x3 convolution's input gradient is grad convolved with the
        # flipped kernel, in and out channels swapped.
        flipped = weight.flip(2, 3).transpose(0, 1)
        if use_extension and winograd_covers(grad, flipped):
            return winograd_conv(grad, flipped, None)
    return channels_last(_conv_backward(grad, x, weight, [True, False, False])[0])


# ---------------------------------------------------------------- weight and bias gradients
def extension_covers(grad: torch.Tensor, x: torch.Tensor, kernel_size: int) -> bool:
    """Whether the extension's weight-gradient kernels can serve these tensors (float32 CPU, in
    channels % 8, out channels % 4 for a 1x1 kernel or % 8 for a 3x3 one, an AVX2 or AVX-512
    CPU, extension built)."""
    from dvpvae import _ext

    out_multiple = 8 if kernel_size == 3 else 4
    return (x.device.type == "cpu" and x.dtype == grad.dtype == torch.float32
            and grad.shape[1] % out_multiple == 0 and x.shape[1] % 8 == 0
            and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and _ext.available())


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     use_extension: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight gradient, bias gradient) of ``F.conv2d(x, weight, bias, padding=k // 2)`` for a
    (out, in, k, k) ``weight`` with k in (1, 3), channels-last ``grad`` and ``x``: from the
    extension where ``use_extension``, ``extension_covers`` and the CPU is AVX2-class (not
    AVX-512), else from oneDNN."""
    if weight.shape[-2:] not in ((1, 1), (3, 3)):
        raise ValueError(f"conv_weight_grad: weight must be 1x1 or 3x3, got shape {tuple(weight.shape)}")
    if use_extension and _extension_isa() and extension_covers(grad, x, weight.shape[-1]):
        return torch.ops.dvpvae.conv_weight_grad(grad, x, weight.shape[-1])
    # The bias gradient as ATen's channel sum: inductor would otherwise fuse the sums of
    # many layers into one strided reduction that is slower than a sum per gradient.
    return _conv_backward(grad, x, weight, [False, True, False])[1], grad.sum((0, 2, 3))


# ---------------------------------------------------------------- the convolution op
def conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            use_extension: bool = True) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2)`` for a (out, in, k, k) weight with k in
    (1, 3); channels-last output.

    A covered 3x3 forward runs the extension's Winograd kernel (``winograd_covers``); the
    backward takes the input gradient from ``conv_input_grad(..., use_extension)`` and the
    weight and bias gradients from ``conv_weight_grad(..., use_extension)``.
    """
    if weight.dim() != 4 or weight.shape[-2:] not in ((1, 1), (3, 3)):
        raise ValueError(f"conv_cl: weight must be (out, in, 1, 1) or (out, in, 3, 3), got {tuple(weight.shape)}")
    return _conv_cl(channels_last(x), weight, bias, use_extension)


@torch.library.custom_op("dvpvae::conv_cl", mutates_args=(), tags=_TAGS)
def _conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             use_extension: bool) -> torch.Tensor:
    if use_extension and winograd_covers(x, weight):
        return winograd_conv(x, weight, bias)
    # A (N, 1, H, W) input is channels-last and NCHW at once; oneDNN then returns NCHW.
    return channels_last(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2))


@torch.library.custom_op("dvpvae::conv_cl_backward", mutates_args=(), tags=_TAGS)
def conv_cl_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input_grad: bool,
                     use_extension: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of ``conv_cl`` for channels-last grad and x; grad_x is
    zeros unless ``need_input_grad``."""
    grad_w, grad_b = conv_weight_grad(grad, x, weight, use_extension)
    grad_x = conv_input_grad(grad, x, weight, use_extension) if need_input_grad else torch.zeros_like(x)
    return grad_x, grad_w.contiguous(), grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, use_extension = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.use_extension = bias is not None, use_extension


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = conv_cl_backward(channels_last(grad), x, weight, ctx.needs_input_grad[0],
                                              ctx.use_extension)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_w, (grad_b if ctx.has_bias else None), None


_conv_cl.register_fake(_conv_fake)
conv_cl_backward.register_fake(_backward_fake)
_conv_cl.register_autograd(_backward, setup_context=_setup_context)
# Under CPU autocast (FastDVPVAE's bf16 precision) the convolution runs in bfloat16, as F.conv2d does.
torch.library.register_autocast("dvpvae::conv_cl", "cpu", torch.bfloat16)
