"""OpenAI's pretrained dVAE (8192 codes, 32x32 grid for 256 px images), loaded from its pickles without running them."""

from dalle_vae.openai_dvae.config import OpenAIDVAEConfig
from dalle_vae.openai_dvae.model import OpenAIDiscreteVAE, default_cache_dir, map_pixels, unmap_pixels

__all__ = ["OpenAIDVAEConfig", "OpenAIDiscreteVAE", "default_cache_dir", "map_pixels", "unmap_pixels"]
