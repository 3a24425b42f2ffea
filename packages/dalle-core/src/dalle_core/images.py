"""Small image helpers shared by training and evaluation: tensors <-> PIL, grids written as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_core.errors import ShapeError


def to_pil(image: torch.Tensor) -> Image.Image:
    """``float[C, H, W]`` in ``[0, 1]`` (C = 1 or 3) -> a PIL image."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ShapeError(f"expected an image tensor [C, H, W] with C in (1, 3), got shape {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def square_crop(
    width: int, height: int, min_area: float = 1.0, rng: np.random.Generator | None = None
) -> tuple[int, int, int]:
    """``(left, top, side)`` of a square crop of a ``width x height`` image.

    The centred largest square; or, with ``min_area < 1`` and an ``rng``, a random square whose area is a uniform
    fraction in ``[min_area, 1]`` of the largest square's, at a uniform position (DALLE-pytorch's
    ``RandomResizedCrop(scale=(min_area, 1), ratio=(1, 1))``, measured against the largest square rather than the
    whole image, so every draw fits and none falls back to the centre).
    """
    largest = min(width, height)
    if rng is None or min_area >= 1.0:
        return (width - largest) // 2, (height - largest) // 2, largest
    side = max(1, round(largest * math.sqrt(rng.uniform(min_area, 1.0))))
    return int(rng.integers(width - side + 1)), int(rng.integers(height - side + 1)), side


def from_pil(
    image: Image.Image,
    size: int | None = None,
    *,
    min_crop_area: float = 1.0,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """A PIL image -> ``float32[3, H, W]`` in ``[0, 1]``; with ``size``, a square crop (:func:`square_crop`: centred,
    or random with ``min_crop_area < 1`` and ``rng``) resized to ``size`` (bicubic)."""
    image = image.convert("RGB")
    if size is not None:
        width, height = image.size
        left, top, side = square_crop(width, height, min_crop_area, rng)
        if (width, height, side) != (size, size, size):  # anything but the whole image at its size
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``float[B, C, H, W]`` into one ``float[C, H', W']`` image, ``nrow`` images per row."""
    if images.ndim != 4:
        raise ShapeError(f"expected images [B, C, H, W], got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / nrow)
    grid = torch.full(
        (channels, rows * (height + padding) + padding, nrow * (width + padding) + padding),
        pad_value,
        dtype=images.dtype,
    )
    for index in range(count):
        row, col = divmod(index, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write ``float[B, C, H, W]`` in ``[0, 1]`` as one PNG grid; ``scale`` enlarges it (nearest) for small images."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = to_pil(make_grid(images.detach().cpu().float(), nrow=nrow))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    picture.save(path)
    return path
