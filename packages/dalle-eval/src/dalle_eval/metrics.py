"""Numbers researchers report: VAE reconstruction and codebook usage, transformer cross-entropy on held-out data,
and FID/KID between image sets. Heavier metrics live beside this module: :mod:`dalle_eval.ssim`,
:mod:`dalle_eval.perceptual` (LPIPS), :mod:`dalle_eval.fid`, :mod:`dalle_eval.clip` (CLIP score)."""

from __future__ import annotations

import math

import torch

from dalle_core.protocols import ImageTokenizer
from dalle_eval.fid import FeatureExtractor, extract_features, frechet_distance_from_features, kernel_inception_distance
from dalle_eval.perceptual import Lpips, lpips_distance
from dalle_eval.ssim import ssim
from dalle_train.dalle_trainer import validation_loss
from dalle_train.tokenized import TokenData
from dalle_transformer import DALLE
from dalle_vae.usage import codebook_usage


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [0, 1]: ``10 log10(1 / mse)``."""
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def reconstruction_metrics(
    tokenizer: ImageTokenizer, images: torch.Tensor, batch_size: int = 64, lpips: Lpips | None = None
) -> dict[str, float]:
    """Encode and decode ``images`` (``float[N, C, H, W]`` in [0, 1]) through their discrete codes.

    ``mse``, ``psnr`` and ``ssim`` are means over images of the per-image values (``ssim`` skipped for images under
    11 px); with ``lpips`` also the mean LPIPS. The codebook usage is measured on the codes of these images.
    """
    errors, similarities, perceptual, codes = [], [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        ids = tokenizer.encode(batch)
        codes.append(ids.cpu())
        decoded = tokenizer.decode(ids).to(batch.device, batch.dtype)
        errors.append(((decoded - batch) ** 2).flatten(1).mean(1).cpu())
        if min(batch.shape[-2:]) >= 11:
            similarities.append(ssim(decoded.clamp(0, 1), batch).cpu())
        if lpips is not None:
            perceptual.append(lpips_distance(lpips, decoded.clamp(0, 1), batch))
    mse = torch.cat(errors)
    result = {"mse": float(mse.mean()), "psnr": float(psnr(mse).mean())}
    if similarities:
        result["ssim"] = float(torch.cat(similarities).mean())
    if perceptual:
        result["lpips"] = float(torch.cat(perceptual).mean())
    return result | codebook_usage(torch.cat(codes), tokenizer.num_tokens)


def language_model_metrics(model: DALLE, data: TokenData, batch_size: int = 64) -> dict[str, float]:
    """Text and image cross-entropy (nats) on held-out ``data``, and the same in bits per token."""
    losses = validation_loss(model, data, batch_size)
    return {
        "text_loss": losses["val_text_loss"],
        "image_loss": losses["val_image_loss"],
        "text_bits_per_token": losses["val_text_loss"] / math.log(2),
        "image_bits_per_token": losses["val_image_loss"] / math.log(2),
    }


def distribution_metrics(
    extractor: FeatureExtractor,
    real: torch.Tensor,
    fake: torch.Tensor,
    batch_size: int = 32,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
) -> dict[str, float]:
    """FID and KID (mean and std over subsets) of ``fake`` images against ``real`` ones, under ``extractor``."""
    real_features = extract_features(extractor, real, batch_size)
    fake_features = extract_features(extractor, fake, batch_size)
    kid, kid_std = kernel_inception_distance(real_features, fake_features, kid_subset_size, kid_subsets)
    return {
        "fid": frechet_distance_from_features(real_features, fake_features),
        "kid": kid,
        "kid_std": kid_std,
        "real_images": len(real),
        "fake_images": len(fake),
    }
