"""DVP-VAE: hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024)."""
from dvpvae.config import PRESETS, Config, get_config
from dvpvae.model import DVPVAE, DVPVAEOutput, set_dct_scale
from dvpvae.noise import Noise
from dvpvae.official import from_official

__all__ = ["Config", "PRESETS", "get_config", "DVPVAE", "FastDVPVAE", "DVPVAEOutput", "Noise",
           "set_dct_scale", "from_official"]
__version__ = "0.1.0"


def __getattr__(name):
    # FastDVPVAE imports torch._dynamo, which is slow to import: only when asked for.
    if name == "FastDVPVAE":
        from dvpvae.fast import FastDVPVAE

        return FastDVPVAE
    raise AttributeError(f"module 'dvpvae' has no attribute {name!r}")
