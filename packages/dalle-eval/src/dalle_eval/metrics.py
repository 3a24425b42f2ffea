"""Numbers researchers report: VAE reconstruction and codebook usage, transformer cross-entropy on held-out data."""

from __future__ import annotations

import math

import torch

from dalle_core.protocols import ImageTokenizer
from dalle_train.dalle_trainer import validation_loss
from dalle_train.tokenized import TokenData
from dalle_transformer import DALLE
from dalle_vae.usage import codebook_usage


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1]: ``10 log10(1 / mse)``."""
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def reconstruction_metrics(tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """Encode and decode ``images`` (``float[N, C, H, W]`` in [0, 1]) through their discrete codes.

    ``mse`` is the mean over images of the per-image mean squared error; ``psnr`` the mean of per-image PSNR; the
    codebook usage is measured on the codes of these images.
    """
    errors, codes = [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        ids = tokenizer.encode(batch)
        codes.append(ids)
        errors.append(((tokenizer.decode(ids) - batch) ** 2).flatten(1).mean(1))
    mse = torch.cat(errors)
    return {
        "mse": float(mse.mean()),
        "psnr": float(psnr(mse).mean()),
        **codebook_usage(torch.cat(codes), tokenizer.num_tokens),
    }


def language_model_metrics(model: DALLE, data: TokenData, batch_size: int = 64) -> dict[str, float]:
    """Text and image cross-entropy (nats) on held-out ``data``, and the same in bits per token."""
    losses = validation_loss(model, data, batch_size)
    return {
        "text_loss": losses["val_text_loss"],
        "image_loss": losses["val_image_loss"],
        "text_bits_per_token": losses["val_text_loss"] / math.log(2),
        "image_bits_per_token": losses["val_image_loss"] / math.log(2),
    }
