"""Whether the Triton kernels can run, the error raised when they cannot, and how the ops
are registered with torch.library.

Triton is optional: ``triton``/``tl`` are None without it, so the references still import.
"""
from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


# ----------------------------------------------------------------------------- op registry

NAMESPACE = "dvpvae_kernels"  # the C++ extension owns "dvpvae"


def _interpreted(kernel) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - triton without the interpreter module
        return False
    return isinstance(kernel, InterpretedFunction)


def without_data(a) -> bool:
    """True for fake and meta tensors: tensors being traced, with metadata but no memory."""
    return isinstance(a, torch.Tensor) and (a.device.type == "meta" or is_fake(a))


def concrete(t: torch.Tensor) -> bool:
    """True for a plain tensor outside any tracing (no Python dispatch mode active): what a
    cache of constant tensors may hold."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and _get_current_dispatch_mode() is None


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` through ``torch.library.wrap_triton``, so that tracing
    an op's implementation records the launch.

    Interpreted kernels are launched directly (wrap_triton would pass them through). They
    run as Python on the tensors' host memory, which fake and meta tensors do not have: there
    the launch is skipped, as the op's fake kernel only defines the outputs' metadata.
    """
    if _interpreted(kernel):
        if not any(without_data(a) for a in (*args, *kwargs.values())):
            kernel[grid](*args, **kwargs)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _keep_op(mode, op, types, args, kwargs):
    # Functionalize the op as one node instead of decomposing it into its kernel launches.
    return mode.__torch_dispatch__(op, types, args, kwargs)


def kernel_op(name: str):
    """Decorator: register ``fn`` (built from torch ops and ``launch``) as the non-mutating
    ``torch.library.triton_op`` ``dvpvae_kernels::<name>``; ``fn`` is also its fake kernel.

    On a GPU, functionalization (AOTAutograd) decomposes the op into its kernels, which
    inductor then compiles with the rest of the graph. Interpreted kernels are not traceable
    launches (``wrap_triton`` passes them through), so when the kernels were decorated under
    the interpreter the op is kept as one opaque node that runs the interpreter when called.
    """
    def register(fn):
        op = torch.library.triton_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        if interpreting():
            op.register_torch_dispatch(FunctionalTensorMode, _keep_op)
        return op
    return register
