"""The optional compiled extension ``dvpvae._C`` (csrc/, built by setup.py).

Importing it registers the CPU ops ``torch.ops.dvpvae.*``:

  ddpm_sample_unet(z_T, noise, coef, films, weights, num_res_blocks, groups, eps, temperature)
      -> the prior's T-step sampling loop with a native float32 UNet (dvpvae.native_prior)
  unet_eps(z, films, weights, num_res_blocks, groups, eps) -> one batched native UNet forward
  conv_weight_grad(grad, input, kernel_size) -> (weight grad (Co, Ci, k, k), bias grad (Co,)) of a
      stride-1 1x1 or 3x3 padding-1 convolution on channels-last float32 tensors, the 3x3 one by
      Winograd F(2x2, 3x3) (dvpvae.cpu_conv)
  conv3x3_winograd(input, weight, bias, tile) -> a stride-1 3x3 padding-1 convolution of a
      channels-last float32 input by Winograd F(tile x tile, 3x3), tile 2 or 4 (dvpvae.cpu_conv)

Without it every caller falls back to plain PyTorch.
"""
from __future__ import annotations

try:
    import dvpvae._C  # noqa: F401  (registers the ops)
    _error = None
except ImportError as e:
    _error = f"dvpvae._C is not built ({e})"
except OSError as e:  # built against another torch, missing symbols, ...
    _error = f"dvpvae._C failed to load ({e})"


def available() -> bool:
    return _error is None


def missing_reason() -> str | None:
    """Why the extension is unavailable and how to get it; None when it is loaded."""
    if _error is None:
        return None
    return (_error + "; build it with `pip install --no-build-isolation -e .` "
            "(without DVPVAE_SKIP_EXT_BUILD=1)")
