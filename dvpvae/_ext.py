"""The optional compiled extension ``dvpvae._C`` (csrc/, built by setup.py).

Importing it registers the CPU ops ``torch.ops.dvpvae.*``:

  ddpm_sample_unet(z_T, noise, coef, films, weights, num_res_blocks, groups, eps, temperature)
      -> the prior's T-step sampling loop with a native float32 UNet (dvpvae.native_prior)
  unet_eps(z, films, weights, num_res_blocks, groups, eps) -> one batched native UNet forward
  conv_cl(x, weight, bias, tile) -> a stride-1 1x1 or 3x3 padding-1 convolution of a channels-last
      input: Winograd F(tile x tile, 3x3) for tile 2 or 4, oneDNN for tile 0
  conv_cl_backward(grad, x, weight, tile, extension, output_mask) -> its (input, weight, bias)
      gradients for the passes in output_mask (input; weight and bias), empty tensors for the
      others: the input gradient by the same choice of kernel as the forward, the weight and
      bias gradients by the extension's kernels (Winograd F(tile x tile, 3x3) for 3x3) where
      ``extension``, else oneDNN
  (``dvpvae.cpu_conv`` holds the rules that choose the kernels, and conv_cl's autograd)

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
