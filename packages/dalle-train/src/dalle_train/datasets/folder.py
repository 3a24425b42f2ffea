"""A folder of images, each with a same-stem ``.txt`` file of captions (one per line; one is drawn per use).

``photos/cat.jpg`` + ``photos/cat.txt`` is one sample; sub-folders are searched. Images without a caption file (or
with an empty one) are left out when the folder is scanned, and counted in :attr:`ImageTextFolder.uncaptioned`.
Images are converted to RGB, cropped to a square (the centred largest one, or a random one with ``min_crop_area < 1``,
see :func:`dalle_core.images.square_crop`) and resized to ``image_size``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_core.errors import DataError
from dalle_core.images import from_pil
from dalle_train.datasets.samples import Item

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def caption_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def choose_caption(captions: list[str], rng: np.random.Generator) -> str:
    if not captions:
        raise DataError("no caption (the text is empty)")
    return captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]


class ImageTextFolder:
    """Map-style dataset of ``{"image": float[3, S, S], "caption": str}``; the caption (and random crop) drawn depends
    on ``(seed, epoch, index)``, so a resumed run draws the same ones."""

    def __init__(self, root: str | Path, image_size: int, seed: int = 0, min_crop_area: float = 1.0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        self.root = root
        self.image_size = image_size
        self.seed = seed
        self.min_crop_area = min_crop_area
        self.pairs: list[tuple[Path, Path]] = []
        self.uncaptioned: list[Path] = []
        for image in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            text = image.with_suffix(".txt")
            if text.is_file() and text.stat().st_size > 0:
                self.pairs.append((image, text))
            else:
                self.uncaptioned.append(image)
        if not self.pairs:
            raise DataError(
                f"{root}: found no image with a same-stem .txt caption file ({len(self.uncaptioned)} images without)"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return str(self.pairs[index][0])

    def read(self, index: int, epoch: int) -> Item:
        image_path, text_path = self.pairs[index]
        captions = caption_lines(text_path.read_text(encoding="utf-8"))
        rng = np.random.default_rng((self.seed, epoch, index))
        caption = choose_caption(captions, rng)
        with Image.open(image_path) as picture:
            image = from_pil(picture, self.image_size, min_crop_area=self.min_crop_area, rng=rng)
        return {"image": image, "caption": caption}

    def __getitem__(self, index: int) -> Item:
        return self.read(index, 0)

    def centre_cropped(self) -> ImageTextFolder:
        """The same samples, always centre-cropped (for validation)."""
        view = copy.copy(self)
        view.min_crop_area = 1.0
        return view
