"""torch.compile of the model's passes, with this package's autograd formulas in the cache key.

Inductor's and AOTAutograd's on-disk caches key a compiled graph on the traced forward graph.
That graph names the custom ops (``dvpvae::conv_cl``, the Triton kernels' ops) but not the
Python autograd formulas traced into the backward graph, so after an upgrade that changes a
formula, a warm cache would hand back the old backward graph (calling ops that may no
longer exist). ``compile_pass`` adds a graph pass that changes nothing and whose ``uuid`` is
a hash of the source files holding those formulas, so a changed formula compiles afresh.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from dvpvae import cpu_conv, kernels


@functools.lru_cache(maxsize=None)
def formula_key() -> str:
    """Hash of the modules that register autograd formulas for custom ops."""
    files = [cpu_conv.__file__, *sorted(glob.glob(os.path.join(kernels.__path__[0], "*.py")))]
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


class _FormulaKey(CustomGraphPass):
    """Changes no graph; its uuid puts ``formula_key()`` into the compile caches' keys."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return formula_key()


def compile_pass(fn, mode: str | None = None):
    """``torch.compile(fn, dynamic=False, mode=mode)`` with ``formula_key()`` in its cache keys.

    dynamic=False: a new batch size recompiles once instead of generating slower
    shape-generic code for every size."""
    options = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    options["post_grad_custom_post_pass"] = _FormulaKey()
    return torch.compile(fn, dynamic=False, options=options)
