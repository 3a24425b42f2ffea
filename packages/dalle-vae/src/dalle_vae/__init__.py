"""dalle-vae: image tokenizers for dalle, starting with a trainable Gumbel-softmax DiscreteVAE."""

from dalle_vae.config import DiscreteVAEConfig
from dalle_vae.discrete_vae import DiscreteVAE
from dalle_vae.gumbel import gumbel_sample
from dalle_vae.losses import VAELoss, kl_to_uniform

__all__ = ["DiscreteVAE", "DiscreteVAEConfig", "VAELoss", "gumbel_sample", "kl_to_uniform"]
