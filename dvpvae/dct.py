"""DCT pseudoinputs (MODEL.md section 2): image <-> normalised low-frequency DCT block.

The pseudoinput u of an image is its orthonormal 2-D DCT-II, cropped to the top-left
ctx x ctx coefficients and divided by a per-coefficient scale computed once from the
training data. Only the kept rows of the DCT matrix are ever multiplied, so the crop
costs no discarded work.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import torch


@functools.lru_cache(maxsize=32)
def _dct_matrix_cached(n: int, rows: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    k = torch.arange(rows, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    d[0] = d[0] / math.sqrt(2.0)
    return d.to(dtype=dtype, device=device)


def dct_matrix(n: int, rows: int | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix D[k, i] = s_k cos(pi (i + 0.5) k / n), first ``rows`` rows."""
    return _dct_matrix_cached(n, n if rows is None else rows, dtype, str(torch.device(device)))


def dct2(img: torch.Tensor, ctx_size: int | None = None) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dims, keeping the top-left ctx x ctx block."""
    h, w = img.shape[-2:]
    dh = dct_matrix(h, ctx_size, img.dtype, img.device)
    dw = dct_matrix(w, ctx_size, img.dtype, img.device)
    return dh @ img @ dw.T


def idct2(coef: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``dct2``: a (possibly cropped) coefficient block -> image of ``size``.

    Multiplying by the transposed cropped matrices equals zero-padding then inverting.
    """
    c_h, c_w = coef.shape[-2:]
    dh = dct_matrix(size[0], c_h, coef.dtype, coef.device)
    dw = dct_matrix(size[1], c_w, coef.dtype, coef.device)
    return dh.T @ coef @ dw


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Guard against zero scale entries (a constant coefficient in the training data)."""
    return scale.clamp(min=1.0)


def dct_pseudoinput_ref(x: torch.Tensor, scale: torch.Tensor, ctx_size: int) -> torch.Tensor:
    """Image x in [-1,1] (N,C,H,W) -> normalised pseudoinput (N,C,ctx,ctx) in [-1,1]."""
    coef = dct2((x + 1) * 0.5, ctx_size)
    return torch.clamp(coef / scale, -1.0, 1.0)


def idct_pseudoinput_ref(u: torch.Tensor, scale: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Normalised pseudoinput (N,C,ctx,ctx) -> image (N,C,H,W) in [-1,1]."""
    img = idct2(u * scale, size)
    return 2.0 * torch.clamp(img, 0.0, 1.0) - 1.0


@torch.no_grad()
def compute_dct_scale(images: torch.Tensor | Iterable[torch.Tensor], ctx_size: int,
                      max_images: int | None = None) -> torch.Tensor:
    """max over images of |floor(DCT coefficient)| for the kept block, shape (C,ctx,ctx).

    ``images``: a float tensor (N,C,H,W) in [-1,1] or an iterable of such batches (a
    DataLoader yielding tensors or (tensor, ...) tuples). Zero entries are raised to 1.
    """
    batches = [images] if isinstance(images, torch.Tensor) else images
    scale, seen = None, 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if max_images is not None:
            batch = batch[: max_images - seen]
        if batch.numel() == 0:
            break
        coef = dct2((batch.double() + 1) * 0.5, ctx_size)
        m = coef.floor().abs().amax(0)
        scale = m if scale is None else torch.maximum(scale, m)
        seen += batch.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if scale is None:
        raise ValueError("compute_dct_scale got no images")
    return safe_scale(scale).float()
