"""dalle-vae: image tokenizers for dalle.

- :class:`DiscreteVAE`: a trainable Gumbel-softmax discrete VAE (DALLE-pytorch's, with its ``vae.pt`` import in
  :func:`load_dalle_pytorch_vae`).
- :class:`OpenAIDiscreteVAE`: OpenAI's pretrained dVAE, from its ``encoder.pkl``/``decoder.pkl`` without running them.
- :class:`VQGanVAE`: taming-transformers VQGANs (``VQModel``, ``GumbelVQ``) from their ``.ckpt`` + ``.yaml``.

Each is a ``dalle_core.ImageTokenizer`` registered under the ``dalle.image_tokenizers`` entry points
``discrete_vae``, ``openai_dvae`` and ``vqgan``.
"""

from dalle_vae.config import DiscreteVAEConfig
from dalle_vae.dalle_pytorch import discrete_vae_from_dalle_pytorch, load_dalle_pytorch_vae
from dalle_vae.discrete_vae import DiscreteVAE
from dalle_vae.gumbel import gumbel_sample, reinmax_sample
from dalle_vae.losses import VAELoss, kl_to_uniform
from dalle_vae.openai_dvae import OpenAIDiscreteVAE, OpenAIDVAEConfig
from dalle_vae.vqgan import VQGanConfig, VQGanVAE

__all__ = [
    "DiscreteVAE",
    "DiscreteVAEConfig",
    "OpenAIDVAEConfig",
    "OpenAIDiscreteVAE",
    "VAELoss",
    "VQGanConfig",
    "VQGanVAE",
    "discrete_vae_from_dalle_pytorch",
    "gumbel_sample",
    "kl_to_uniform",
    "load_dalle_pytorch_vae",
    "reinmax_sample",
]
