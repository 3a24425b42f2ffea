"""A trainable Gumbel-softmax discrete VAE (after DALLE-pytorch's ``DiscreteVAE``) that is a dalle ImageTokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_core.errors import ConfigError
from dalle_vae.checks import check_ids, check_images, ids_to_grid
from dalle_vae.config import DiscreteVAEConfig
from dalle_vae.directory import load_tokenizer_model, save_tokenizer_dir
from dalle_vae.gumbel import gumbel_sample, reinmax_sample
from dalle_vae.layers import build_decoder, build_encoder
from dalle_vae.losses import VAELoss, kl_to_uniform


class DiscreteVAE(nn.Module):
    """Images -> a ``fmap_size x fmap_size`` grid of codes in ``[0, num_tokens)`` -> images.

    Training: minimise ``loss(images).loss`` (Gumbel-softmax relaxation of the code choice). Tokenizing: ``encode``
    takes the argmax code at each grid position, ``decode`` maps codes through the codebook and decoder back to
    ``[0, 1]`` images. There is no dropout or batch norm, so ``encode``/``decode`` are deterministic in any mode.
    """

    kind = "discrete_vae"
    norm_mean: torch.Tensor
    norm_std: torch.Tensor

    def __init__(self, config: DiscreteVAEConfig) -> None:
        super().__init__()
        if not isinstance(config, DiscreteVAEConfig):
            raise ConfigError(f"config must be a DiscreteVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = build_encoder(config)
        self.codebook = nn.Embedding(config.num_tokens, config.codebook_dim)
        self.decoder = build_decoder(config)
        means, stds = config.normalization or ((0.0,) * config.channels, (1.0,) * config.channels)
        # Not persistent: they are derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("norm_mean", torch.tensor(means).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("norm_std", torch.tensor(stds).view(1, -1, 1, 1), persistent=False)

    # --- ImageTokenizer properties -------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def fmap_size(self) -> int:
        return self.config.fmap_size

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        return check_images(images, channels=self.channels, image_size=self.image_size, like=self.codebook.weight)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return check_ids(ids, fmap_size=self.fmap_size, num_tokens=self.num_tokens, device=self.codebook.weight.device)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images -> the space the encoder reads and the decoder writes (identity without normalization)."""
        if self.config.normalization is None:
            return images
        return (images - self.norm_mean) / self.norm_std

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize` (not clamped)."""
        if self.config.normalization is None:
            return images
        return images * self.norm_std + self.norm_mean

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codebook-space maps ``[B, codebook_dim, f, f]`` -> decoder output (normalized space, differentiable)."""
        return self.decoder(codes)

    # --- public API ------------------------------------------------------------------------------------------------

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> code logits ``float[B, num_tokens, f, f]`` (differentiable)."""
        return self.encoder(self.normalize(self._check_images(images)))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> ``int64[B, fmap_size**2]``: the argmax code per cell, row-major."""
        return self.logits(images).argmax(dim=1).flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``int[B, fmap_size**2]`` codes -> ``float32[B, C, S, S]`` images in ``[0, 1]``."""
        ids = self._check_ids(ids)
        codes = self.codebook(ids_to_grid(ids, self.fmap_size)).permute(0, 3, 1, 2)
        return self.denormalize(self.decoder(codes)).clamp(0.0, 1.0).float()

    def loss(
        self,
        images: torch.Tensor,
        temperature: float | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> VAELoss:
        """The training objective on ``float[B, C, S, S]`` images in ``[0, 1]``.

        A Gumbel-softmax sample of the code logits (``temperature`` defaults to ``config.temperature``; hard one-hot
        with straight-through gradients if ``config.straight_through``) mixes codebook vectors that the decoder turns
        back into the normalized image. With ``config.reinmax`` the hard sample gets ReinMax gradients instead.
        ``generator`` seeds the Gumbel noise.
        """
        temperature = self.config.temperature if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
        target = self.normalize(self._check_images(images))
        logits = self.encoder(target)
        if self.config.reinmax:
            one_hot = reinmax_sample(logits, float(temperature), generator=generator)
        else:
            one_hot = gumbel_sample(logits, float(temperature), hard=self.config.straight_through, generator=generator)
        codes = torch.einsum("bnhw,nd->bdhw", one_hot, self.codebook.weight)
        output = self.decoder(codes)
        if self.config.smooth_l1_loss:
            reconstruction_loss = F.smooth_l1_loss(output, target)
        else:
            reconstruction_loss = F.mse_loss(output, target)
        kl_loss = kl_to_uniform(logits)
        total = reconstruction_loss + self.config.kl_div_loss_weight * kl_loss
        reconstructions = self.denormalize(output.detach()).clamp(0.0, 1.0)
        return VAELoss(total, reconstruction_loss, kl_loss, reconstructions)

    def forward(
        self,
        images: torch.Tensor,
        temperature: float | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> VAELoss:
        """Same as :meth:`loss` (so hooks and wrappers such as DDP see the training computation)."""
        return self.loss(images, temperature, generator=generator)

    # --- checkpoints -----------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Atomically write ``spec.json``, ``config.json`` and ``model.safetensors`` into ``directory``."""
        save_tokenizer_dir(directory, self.kind, self.state_dict(), self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> DiscreteVAE:
        """Rebuild a model written by :meth:`save`, in eval mode on CPU; mismatched weights raise CheckpointError."""
        return load_tokenizer_model(cls, DiscreteVAEConfig.from_dict, directory)
