"""Fused kernels of the DVP-VAE fast path, one op per module, each beside its reference.

Importing this package never imports Triton eagerly; the Triton kernels load on first use.
"""
from kernels._backend import available_backends, use_backend

__all__ = ["available_backends", "use_backend"]
