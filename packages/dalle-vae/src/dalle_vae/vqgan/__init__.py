"""taming-transformers VQGANs (``VQModel``, ``GumbelVQ``) re-implemented, loaded strictly from their checkpoints."""

from dalle_vae.vqgan.config import VQGanConfig
from dalle_vae.vqgan.model import VQGanVAE
from dalle_vae.vqgan.taming_import import read_taming_state_dict, read_taming_yaml

__all__ = ["VQGanConfig", "VQGanVAE", "read_taming_state_dict", "read_taming_yaml"]
