"""DVP-VAE: hierarchical VAE with a diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024)."""
from dvpvae.config import PRESETS, Config, get_config

__all__ = ["Config", "PRESETS", "get_config"]
__version__ = "0.1.0"
