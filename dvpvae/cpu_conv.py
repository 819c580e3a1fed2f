"""The ResNet blocks' convolutions for the CPU provider: channels-last, one op per direction.

``conv_cl`` is a stride-1 convolution with a 1x1 or 3x3 (zero-padding 1) kernel. On AVX-512
CPUs a float32 1x1 convolution is a matrix product of the pixel rows (``pointwise_gemm``, plain
PyTorch, with or without the extension), whose bias a compiled graph adds in the next
elementwise pass. Elsewhere the extension's kernels serve wherever they cover the shape (float32
on AVX2 and AVX-512 CPUs): every pass of a 3x3 convolution by Winograd F(4x4, 3x3) or
F(2x2, 3x3) (``winograd_tile``; 2.25 or 4 multiplies per output instead of 9;
``csrc/conv_winograd_cpu.cpp``), and a 1x1 convolution's weight gradient by
``csrc/conv_wgrad_cpu.cpp``. Everything else comes from oneDNN. The choice is a rule on shape,
dtype and ISA (``gemm_covers``, ``conv_tile``, ``extension_covers``), so every process computes
the same numbers. Outside the GEMM form, the forward and the backward are each one op of the
extension (``csrc/conv_cl_cpu.cpp``) that takes the rule's choice as an argument: the rule runs
when a graph is traced, and compiled graphs call the ops directly. One op computes both
gradients, so a compiled graph hands them a single output-gradient buffer. Without the
extension the rest is ``F.conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dvpvae import _ext

_CL = torch.channels_last


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory format (no copy when it already is)."""
    return t.contiguous(memory_format=_CL)


# Where the extension's kernels beat oneDNN, with the extension built; a constant, since
# compiled graphs apply the rules below when traced. They run in 16-float vectors on AVX-512
# CPUs, in 8-float ones on AVX2 CPUs.
_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_KERNEL_ISA = _CAPABILITY in ("AVX2", "AVX512") and _ext.available()
# The float32 GEMM with the bias left to the next pass beats oneDNN's 1x1 convolution on
# AVX-512 CPUs in the training step; oneDNN's is faster in bfloat16.
_GEMM_ISA = _CAPABILITY == "AVX512"


# ---------------------------------------------------------------- which kernel serves each pass
def gemm_covers(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``conv_cl`` computes this convolution by ``pointwise_gemm``: a float32 CPU 1x1
    convolution outside autocast on an AVX-512 CPU."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape[-2:] == (1, 1) and not torch.is_autocast_enabled("cpu") and _GEMM_ISA)


def winograd_covers(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the extension's Winograd kernel computes ``F.conv2d(x, weight, padding=1)`` here:
    a float32 CPU 3x3 convolution with in and out channels % 8 on an AVX2 or AVX-512 CPU."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and weight.shape[-2:] == (3, 3) and x.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0
            and _KERNEL_ISA)


def winograd_tile(height: int, width: int) -> int:
    """Output tile side of the Winograd form for an image of this size: 4 (F(4x4, 3x3), 36
    transformed points per 4x4 tile) where that covers the image with fewer points than 2
    (F(2x2, 3x3), 16 per 2x2 tile), partial edge tiles counted whole."""
    def points(m):
        return -(-height // m) * -(-width // m) * (m + 2) ** 2
    return 4 if points(4) < points(2) else 2


def conv_tile(x: torch.Tensor, weight: torch.Tensor) -> int:
    """The ``tile`` argument of the ``conv_cl`` and ``conv_cl_backward`` ops for this
    convolution: the Winograd tile where ``winograd_covers``, else 0 (oneDNN). The input
    gradient is the flipped kernel's convolution of an output-sized gradient and the weight
    gradient sums products over the same tiles, so the same rule holds for both."""
    return winograd_tile(*x.shape[-2:]) if winograd_covers(x, weight) else 0


def extension_covers(grad: torch.Tensor, x: torch.Tensor, kernel_size: int) -> bool:
    """The ``extension`` argument of the ``conv_cl_backward`` op: whether the extension's
    weight-gradient kernels serve these tensors (float32 CPU, in channels % 8, out channels % 4
    for a 1x1 kernel or % 8 for a 3x3 one, where ``winograd_covers`` then holds too, an AVX2 or
    AVX-512 CPU, extension built)."""
    out_multiple = 8 if kernel_size == 3 else 4
    return (x.device.type == "cpu" and x.dtype == grad.dtype == torch.float32
            and grad.shape[1] % out_multiple == 0 and x.shape[1] % 8 == 0 and _KERNEL_ISA)


# ---------------------------------------------------------------- the convolution
def pointwise_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a (out, in, 1, 1) weight and a channels-last ``x``: the
    (N*H*W, in) @ (in, out) product of its pixel rows, plus the bias as a separate broadcast add
    (``addmm`` would first copy the bias into every row); channels-last output."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)
    out = (rows @ weight[:, :, 0, 0].t()).view(n, h, w, -1).permute(0, 3, 1, 2)
    return out if bias is None else out + bias[:, None, None]


def conv_cl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            use_extension: bool = True) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=k // 2)`` for a (out, in, k, k) weight with k in
    (1, 3); channels-last output.

    Where ``gemm_covers``, ``pointwise_gemm``. Otherwise, on the CPU with the extension
    (``use_extension`` and built) each pass is one of its ops: the forward and input gradient
    from ``conv_tile``'s kernel, the weight and bias gradients from ``extension_covers``'.
    Otherwise ``F.conv2d``.
    """
    if weight.dim() != 4 or weight.shape[-2:] not in ((1, 1), (3, 3)):
        raise ValueError(f"conv_cl: weight must be (out, in, 1, 1) or (out, in, 3, 3), got {tuple(weight.shape)}")
    if x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv_cl: input {tuple(x.shape)} must be (N, {weight.shape[1]}, H, W) for weight "
                         f"{tuple(weight.shape)}")
    x = channels_last(x)
    if gemm_covers(x, weight):
        return pointwise_gemm(x, weight, bias)
    if not (use_extension and _ext.available() and x.device.type == "cpu"):
        # A (N, 1, H, W) input is channels-last and NCHW at once; oneDNN then returns NCHW.
        return channels_last(F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2))
    if torch.is_autocast_enabled("cpu"):
        # The dtype CPU autocast computes convolutions in, cast here so that the kernel rules see it.
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return torch.ops.dvpvae.conv_cl(x, weight, bias, conv_tile(x, weight))


def _setup_context(ctx, inputs, output):
    x, weight, bias, tile = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias, ctx.tile = bias is not None, tile


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = channels_last(grad)
    want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_x, grad_w, grad_b = torch.ops.dvpvae.conv_cl_backward(
        grad, x, weight, ctx.tile, extension_covers(grad, x, weight.shape[-1]), [want_x, want_w])
    return (grad_x if want_x else None, grad_w if ctx.needs_input_grad[1] else None,
            grad_b if ctx.needs_input_grad[2] else None, None)


if _ext.available():
    torch.library.register_autograd("dvpvae::conv_cl", _backward, setup_context=_setup_context)
