"""Cheaper forms of three reference layers, exact up to float rounding (used by the fast
op providers, ``dvpvae.ops``):

* bilinear upsampling (``align_corners=False``) as two small matmuls with fixed
  interpolation matrices, whose backward is two matmuls instead of a scatter-add;
* a 1x1 convolution with a handful of input channels (the z projections) as a broadcast
  multiply-add that the compiler fuses into its neighbours;
* the output head ``conv3x3(conv1x1(a))`` as one 3x3 convolution with the composed weight
  plus a constant bias image (the 3x3 conv's zero padding pads the 1x1 conv's *output*, so
  its bias contributes only the in-image taps).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# Above this many input channels a 1x1 conv runs as a convolution: the broadcast form's
# work grows with in_channels while oneDNN's fixed overhead stops dominating.
MAX_BROADCAST_IN_CHANNELS = 4


@functools.lru_cache(maxsize=64)
def bilinear_matrix(out_size: int, in_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(out_size, in_size) matrix M with M @ v == 1-D bilinear resize of v (align_corners=False).

    Built by resizing the identity with ``F.interpolate`` itself (float64, CPU), so the
    weights and the edge clamping are exactly the reference's.
    """
    eye = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, 1, in_size)
    cols = F.interpolate(eye, size=(1, out_size), mode="bilinear", align_corners=False)
    return cols.reshape(in_size, out_size).t().to(device=device, dtype=dtype).contiguous()


def upsample_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """``F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)`` as matmuls."""
    rows = bilinear_matrix(size, x.shape[-2], x.dtype, x.device)
    cols = bilinear_matrix(size, x.shape[-1], x.dtype, x.device)
    return rows @ x @ cols.t()


def pointwise_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a 1x1 ``conv``; a broadcast multiply-add when it has few input channels."""
    if conv.in_channels > MAX_BROADCAST_IN_CHANNELS:
        return conv(x)
    w = conv.weight[:, :, 0, 0]
    out = conv.bias[:, None, None] if conv.bias is not None else 0.0
    for i in range(conv.in_channels):
        out = out + x[:, i:i + 1] * w[:, i, None, None]
    return out


def composed_head(a: torch.Tensor, pointwise: nn.Conv2d, conv3x3: nn.Conv2d) -> torch.Tensor:
    """``conv3x3(pointwise(a))`` as one 3x3 conv over ``a``'s channels plus a bias image.

    Requires stride 1 and zero padding 1 on ``conv3x3`` (the decoder head's shape).
    """
    w1 = pointwise.weight[:, :, 0, 0]  # (mid, in)
    w2 = conv3x3.weight  # (out, mid, 3, 3)
    weight = torch.einsum("omyx,mi->oiyx", w2, w1)
    out = F.conv2d(a, weight, conv3x3.bias, padding=1)
    if pointwise.bias is not None:
        # The 1x1 bias is a constant image inside the border and zero in the padding.
        bias_w = torch.einsum("omyx,m->oyx", w2, pointwise.bias)[:, None]
        ones = a.new_ones((1, 1) + tuple(a.shape[-2:]))
        out = out + F.conv2d(ones, bias_w, padding=1)
    return out
