"""Loader for the optional compiled extension ``dvpvae._C`` (see csrc/).

The extension is optional: every caller checks ``available()`` and falls back to the
plain-PyTorch path when it is missing.
"""
from __future__ import annotations

import importlib

_module = None
_tried = False


def load():
    """Return the compiled extension module, or None when it is not built."""
    global _module, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("dvpvae._C")
        except ImportError:
            _module = None
    return _module


def available() -> bool:
    return load() is not None
