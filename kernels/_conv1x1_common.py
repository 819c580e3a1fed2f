"""Argument checks and tile sizes shared by the 1x1-convolution ops (no kernels)."""
from __future__ import annotations

import torch

from ._triton import interpreting

TRITON_DTYPES = (torch.float32, torch.float64)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    x_name: str = "x") -> None:
    """Shapes/devices/dtypes of an NCHW input and an nn.Conv2d 1x1 weight (out, in, 1, 1)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{x_name} must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{x_name} must be floating point, got {x.dtype}")
    if (not isinstance(weight, torch.Tensor) or weight.dim() != 4
            or tuple(weight.shape[2:]) != (1, 1)):
        raise ValueError("weight must be an nn.Conv2d 1x1 weight of shape (out, in, 1, 1), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels but {x_name} has "
                         f"{x.shape[1]}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else bias!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from {x_name} dtype {x.dtype}")


def check_triton_dtype(x: torch.Tensor) -> None:
    if x.dtype not in TRITON_DTYPES:
        raise ValueError(f"the triton 1x1-conv kernels support float32/float64, got {x.dtype}; "
                         "conv1x1_act_ref/conv1x1_residual_ref take other dtypes")


def matmul_blocks(m: int, n: int, k: int) -> tuple[int, int, int]:
    """Tile sizes (BLOCK_M over output channels, BLOCK_N over pixels, BLOCK_K reduction).

    GPU tiles fit fp32 and fp64 accumulators in registers; the interpreter pays per program,
    so its tiles are larger. Every side is >= 16 (tl.dot's minimum); masks handle the edges.
    """
    if interpreting():
        cap_m, cap_n, cap_k = 128, 256, 128
    else:
        cap_m, cap_n, cap_k = 64, 64, 32
    return (min(cap_m, max(16, _pow2(m))), min(cap_n, max(16, _pow2(n))),
            min(cap_k, max(16, _pow2(k))))


def reduction_split(tiles: int, programs_2d: int) -> int:
    """How many partial sums the weight-gradient reduction over N*H*W is split into.

    Partial sums go to a (split, out, in) buffer summed by torch afterwards: deterministic
    (no atomics) and enough programs to fill a GPU. No split in the interpreter, which pays
    per program.
    """
    if interpreting():
        return 1
    return max(1, min(tiles, 256 // max(1, programs_2d)))
