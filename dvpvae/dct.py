"""DCT helpers for the pseudoinputs (MODEL.md section 2).

The pseudoinput transforms themselves (image -> normalised cropped DCT block and back) live
beside their fused kernels in ``kernels/dct_pseudoinput.py``; this module holds the plain
2-D DCT and ``compute_dct_scale``, the per-coefficient scale taken from training data.
"""
from __future__ import annotations

from typing import Iterable

import torch

from dvpvae.kernels.dct_pseudoinput import dct_basis


def dct_matrix(n: int, rows: int | None = None, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix D[k, i] = s_k cos(pi (i + 0.5) k / n), first ``rows`` rows."""
    return dct_basis(n, n if rows is None else rows, dtype, torch.device(device))


def dct2(img: torch.Tensor, ctx_size: int | None = None) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dims, keeping the top-left ctx x ctx block."""
    h, w = img.shape[-2:]
    dh = dct_matrix(h, ctx_size, img.dtype, img.device)
    dw = dct_matrix(w, ctx_size, img.dtype, img.device)
    return dh @ img @ dw.T


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """Guard against zero scale entries (a constant coefficient in the training data)."""
    return scale.clamp(min=1.0)


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
