"""Backend selection shared by every op in ``kernels/``.

Backends:
  * ``reference``: the plain-PyTorch ``<op>_ref`` (always available).
  * ``triton``: the Triton kernels; on CUDA tensors natively, on CPU tensors only in the
    Triton interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported).
  * ``cpp``: the compiled ``dvpvae_ext`` extension (only ops that have one).

Default choice per call: ``triton`` for CUDA tensors or when the interpreter is on,
otherwise the best CPU implementation the op offers (``cpp`` if given and built, else
``reference``). ``use_backend(name)`` or an explicit ``backend=`` argument overrides it;
asking for a backend that is missing raises an error that says how to get it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

BACKENDS = ("reference", "triton", "cpp")

_state = threading.local()


def triton_interpret() -> bool:
    """True when Triton kernels run through the interpreter on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _has_cpp() -> bool:
    from dvpvae import _ext  # local import: the extension loader lives in the package

    return _ext.available()


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends usable for tensors on ``device`` in this process."""
    device = torch.device(device)
    found = ["reference"]
    if _has_triton() and (device.type == "cuda" or triton_interpret()):
        found.append("triton")
    if _has_cpp():
        found.append("cpp")
    return found


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force every op called inside the block to use backend ``name`` (None = automatic)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    previous = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = previous


def _missing_message(name: str, device: torch.device) -> str:
    if name == "triton":
        if not _has_triton():
            return "backend 'triton' needs the triton package: pip install triton"
        return (f"backend 'triton' cannot run on {device.type} tensors; use CUDA tensors or "
                "set TRITON_INTERPRET=1 before importing triton to run the interpreter on CPU")
    return ("backend 'cpp' needs the compiled extension: reinstall with "
            "`pip install --no-build-isolation -e .` (unset DVPVAE_SKIP_EXT_BUILD) "
            "and a working C++ compiler")


def resolve(op: str, device: torch.device, requested: str | None, supported: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``supported`` lists the backends ``op`` implements, in order of CPU preference.
    """
    name = requested if requested is not None else getattr(_state, "forced", None)
    usable = available_backends(device)
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
        if name not in supported:
            raise ValueError(f"op {op!r} has no {name!r} backend; it supports {supported}")
        if name not in usable:
            raise RuntimeError(_missing_message(name, device))
        return name
    if "triton" in supported and "triton" in usable:
        return "triton"
    for candidate in supported:
        if candidate != "triton" and candidate in usable:
            return candidate
    return "reference"
