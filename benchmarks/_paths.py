"""Imported first by every benchmark script: this checkout's ``dvpvae`` before any installed
copy, and this folder (for ``_harness``) last, so that benchmarks/kernels.py shadows nothing."""
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)

if BENCH not in sys.path:
    sys.path.append(BENCH)
if ROOT in sys.path:
    sys.path.remove(ROOT)
sys.path.insert(0, ROOT)
