"""Fused Triton kernels of the DVP-VAE fast path, one op per module.

Each op module exports ``<op>_ref`` (plain PyTorch, the oracle) and ``<op>`` (the Triton
kernels, through the ``torch.library.triton_op`` ``dvpvae_kernels::<op>`` with its backward
registered, so torch.compile traces it without a graph break). ``triton_runs_on(device)``
says whether ``<op>`` can run there; ``<op>`` raises a RuntimeError where it cannot.
"""
from ._triton import triton_runs_on

__all__ = ["triton_runs_on"]
