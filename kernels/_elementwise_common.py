"""Argument checks and launch sizes shared by the elementwise ops (reparam_kl, ddpm_step)."""
from __future__ import annotations

import torch

from ._triton import tl, triton

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype):
    """Accumulator type for a kernel: fp64 stays fp64, everything else accumulates in fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def flat_config(numel: int) -> tuple[int, int, int]:
    """(BLOCK, grid size, num_warps) of a 1-D launch over ``numel`` elements."""
    block = max(16, min(1024, triton.next_power_of_2(numel)))
    return block, triton.cdiv(numel, block), (4 if block >= 512 else 1)


def check_matching(op: str, names, tensors) -> None:
    """Every tensor must have the first one's shape, dtype and device and be contiguous."""
    ref = tensors[0]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != ref.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected "
                             f"{tuple(ref.shape)} (the shape of {names[0]}); no broadcasting")
        if t.dtype != ref.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}, expected {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {ref.device}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()})")
    if ref.dtype not in DTYPES:
        raise ValueError(f"{op}: dtype {ref.dtype} not supported; use one of {DTYPES}")
