"""Input checks shared by every image tokenizer here: one-line errors that name what was expected and received."""

from __future__ import annotations

import torch

from dalle_core.errors import ShapeError, VocabularyError


def check_images(images: torch.Tensor, *, channels: int, image_size: int, like: torch.Tensor) -> torch.Tensor:
    """Validate ``float[B, channels, image_size, image_size]`` images and move them to ``like``'s device and dtype."""
    expected = f"[B, {channels}, {image_size}, {image_size}]"
    if not isinstance(images, torch.Tensor):
        raise ShapeError(f"expected an image tensor {expected}, got {type(images).__name__}")
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[1] != channels or shape[2] != image_size or shape[3] != image_size:
        raise ShapeError(f"expected images of shape {expected}, got {shape}")
    if not images.is_floating_point():
        raise ShapeError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")
    return images.to(device=like.device, dtype=like.dtype)


def check_ids(ids: torch.Tensor, *, fmap_size: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """Validate ``int[B, fmap_size**2]`` token ids in ``[0, num_tokens)``; returns them as int64 on ``device``."""
    seq = fmap_size**2
    if not isinstance(ids, torch.Tensor):
        raise ShapeError(f"expected an id tensor [B, {seq}], got {type(ids).__name__}")
    if ids.ndim != 2 or ids.shape[1] != seq:
        raise ShapeError(f"expected ids of shape [B, {seq}] (fmap_size**2), got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ShapeError(f"expected integer ids, got dtype {ids.dtype}")
    if ids.numel() > 0:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= num_tokens:
            bad = low if low < 0 else high
            raise VocabularyError(f"image token id {bad} is outside [0, num_tokens={num_tokens})")
    return ids.to(device=device, dtype=torch.long)


def ids_to_grid(ids: torch.Tensor, fmap_size: int) -> torch.Tensor:
    """``[B, fmap_size**2]`` -> ``[B, fmap_size, fmap_size]`` (row-major)."""
    return ids.view(ids.shape[0], fmap_size, fmap_size)
