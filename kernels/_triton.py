"""Whether the Triton kernels can run, and the error raised when they cannot.

Triton is optional: ``triton``/``tl`` are None without it, so the references still import.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (on CPU tensors).

    The variable must be set before ``triton`` is imported: ``@triton.jit`` reads it when
    the kernels are decorated.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors on ``device``: CUDA tensors, or any
    tensors under the interpreter; always False without the triton package."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


def require_triton(op: str, device: torch.device) -> None:
    """Raise a RuntimeError saying why ``op``'s Triton kernel cannot run on ``device``."""
    if triton is None:
        raise RuntimeError(f"{op}: the Triton kernel needs the triton package "
                           f"(pip install triton); {op}_ref is the plain-PyTorch version")
    if not triton_runs_on(device):
        raise RuntimeError(f"{op}: the Triton kernel cannot run on {torch.device(device).type} "
                           "tensors; use CUDA tensors, or set TRITON_INTERPRET=1 before triton "
                           f"is imported to run it in the interpreter; {op}_ref is the "
                           "plain-PyTorch version")
