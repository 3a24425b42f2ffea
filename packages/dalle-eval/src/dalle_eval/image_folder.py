"""Image/caption pairs from memory: a folder of images (captions in same-stem ``.txt`` files) or the shapes dataset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from dalle_core.errors import DataError
from dalle_core.images import from_pil
from dalle_train.datasets.shapes import ShapesDataset, split_specs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageTextPairs:
    """``images: float32[N, 3, S, S]`` in [0, 1]; ``captions[i]`` describes ``images[i]`` (empty when unknown)."""

    images: torch.Tensor
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions):
            raise DataError(f"expected one caption per image, got {len(self.images)} images, {len(self.captions)}")
        if len(self.images) == 0:
            raise DataError("the image set is empty")

    def __len__(self) -> int:
        return len(self.captions)


def load_image_folder(directory: str | Path, image_size: int, with_captions: bool = True) -> ImageTextPairs:
    """Every image under ``directory`` (sorted), centre-cropped and resized to ``image_size``.

    With ``with_captions`` each non-empty line of the image's same-stem ``.txt`` is one pair (images without one are
    skipped); without, each image appears once with an empty caption.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"image folder not found: {directory}")
    images, captions = [], []
    for path in sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        lines = [""]
        if with_captions:
            text = path.with_suffix(".txt")
            lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines()] if text.is_file() else []
            lines = [line for line in lines if line]
            if not lines:
                continue
        try:
            with Image.open(path) as picture:
                tensor = from_pil(picture, image_size)
        except (UnidentifiedImageError, OSError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None
        for line in lines:
            images.append(tensor)
            captions.append(line)
    if not images:
        wanted = "images with same-stem .txt captions" if with_captions else "images"
        raise DataError(f"found no {wanted} ({', '.join(IMAGE_SUFFIXES)}) under {directory}")
    return ImageTextPairs(torch.stack(images), tuple(captions))


def shapes_pairs(
    image_size: int,
    split: str = "heldout",
    samples_per_spec: int = 4,
    seed: int = 0,
    holdout_fraction: float = 0.15,
) -> ImageTextPairs:
    """Renderings of the shapes ``split`` (``train``, ``heldout`` or ``all``) as made by :func:`split_specs`.

    The demo trains on ``split_specs(seed, 0.15)``'s train specs with dataset seed ``seed`` and renders held-out
    images with ``seed + 1``; the same is done here so evaluation images match the demo's.
    """
    train, heldout = split_specs(seed, holdout_fraction)
    choices = {"train": (train, seed), "heldout": (heldout, seed + 1), "all": (train + heldout, seed + 2)}
    if split not in choices:
        raise DataError(f"shapes split must be one of {sorted(choices)}, got {split!r}")
    specs, data_seed = choices[split]
    dataset = ShapesDataset(specs, samples_per_spec, image_size, seed=data_seed)
    return ImageTextPairs(dataset.images.float() / 255.0, tuple(dataset.captions))
