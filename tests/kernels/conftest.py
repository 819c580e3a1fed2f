"""Kernel tests run the Triton kernels through the interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET before triton is imported)."""
import os
import sys

# `import tests.kernels.utils` under a plain `pytest` call (tests/ is not a package).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
