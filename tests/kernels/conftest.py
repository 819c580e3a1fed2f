"""Kernel tests run the Triton kernels through the interpreter on CPU tensors.

The environment variable must be set before anything imports ``triton``: ``@triton.jit``
decides at decoration time whether to build an interpreter wrapper. ``setdefault`` keeps
an explicit ``TRITON_INTERPRET=0`` (e.g. on a GPU runner) in force.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton 3.9 warns once per process that its FP-fusion default will change; pin today's
# default so the tests do not depend on the version's choice (and stay quiet).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# Make `import kernels` / `import tests.kernels.utils` work under a plain `pytest` call
# (the repository is not necessarily pip-installed).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
