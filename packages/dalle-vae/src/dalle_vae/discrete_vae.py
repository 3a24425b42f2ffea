"""A trainable Gumbel-softmax discrete VAE (after DALLE-pytorch's ``DiscreteVAE``) that is a dalle ImageTokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dalle_core.checkpoint import atomic_directory, load_weights, read_json, save_weights, write_json
from dalle_core.errors import CheckpointError, ConfigError, ShapeError, VocabularyError
from dalle_core.registry import SPEC_FILE
from dalle_vae.config import DiscreteVAEConfig
from dalle_vae.gumbel import gumbel_sample
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
        expected = f"[B, {self.channels}, {self.image_size}, {self.image_size}]"
        if not isinstance(images, torch.Tensor):
            raise ShapeError(f"expected an image tensor {expected}, got {type(images).__name__}")
        shape = tuple(images.shape)
        if images.ndim != 4 or shape[1] != self.channels or shape[2] != self.image_size or shape[3] != self.image_size:
            raise ShapeError(f"expected images of shape {expected}, got {shape}")
        if not images.is_floating_point():
            raise ShapeError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")
        weight = self.codebook.weight
        return images.to(device=weight.device, dtype=weight.dtype)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        seq = self.fmap_size**2
        if not isinstance(ids, torch.Tensor):
            raise ShapeError(f"expected an id tensor [B, {seq}], got {type(ids).__name__}")
        if ids.ndim != 2 or ids.shape[1] != seq:
            raise ShapeError(f"expected ids of shape [B, {seq}] (fmap_size**2), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ShapeError(f"expected integer ids, got dtype {ids.dtype}")
        if ids.numel() > 0:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.num_tokens:
                bad = low if low < 0 else high
                raise VocabularyError(f"image token id {bad} is outside [0, num_tokens={self.num_tokens})")
        return ids.to(device=self.codebook.weight.device, dtype=torch.long)

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
        codes = self.codebook(ids.view(ids.shape[0], self.fmap_size, self.fmap_size)).permute(0, 3, 1, 2)
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
        back into the normalized image. ``generator`` seeds the Gumbel noise.
        """
        temperature = self.config.temperature if temperature is None else temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
        target = self.normalize(self._check_images(images))
        logits = self.encoder(target)
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
        with atomic_directory(directory) as staging:
            write_json(staging / SPEC_FILE, {"kind": self.kind})
            save_weights(staging, self.state_dict(), self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> DiscreteVAE:
        """Rebuild a model written by :meth:`save`, in eval mode on CPU; mismatched weights raise CheckpointError."""
        directory = Path(directory)
        spec_path = directory / SPEC_FILE
        if spec_path.is_file():
            kind = read_json(spec_path).get("kind")
            if kind != cls.kind:
                raise CheckpointError(f"{spec_path}: expected kind {cls.kind!r}, got {kind!r}")
        config_dict, state = load_weights(directory)
        try:
            config = DiscreteVAEConfig.from_dict(config_dict)
        except ConfigError as error:
            raise CheckpointError(f"{directory / 'config.json'}: {error}") from None
        model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{directory}: weights do not match the config: missing keys {_names(missing)}, "
                f"unexpected keys {_names(unexpected)}"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{directory}: weight {name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[name].shape)}"
                )
        model.load_state_dict(state, strict=True)
        return model.eval()


def _names(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"
