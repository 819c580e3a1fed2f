"""DVP-VAE: hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024)."""
from dvpvae.config import PRESETS, Config, get_config
from dvpvae.fast import FastDVPVAE
from dvpvae.model import DVPVAE, DVPVAEOutput, set_dct_scale
from dvpvae.noise import Noise
from dvpvae.official import from_official

__all__ = ["Config", "PRESETS", "get_config", "DVPVAE", "FastDVPVAE", "DVPVAEOutput", "Noise",
           "set_dct_scale", "from_official"]
__version__ = "0.1.0"
