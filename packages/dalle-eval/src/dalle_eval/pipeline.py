"""Text in, images out: tokenizer -> transformer -> image tokenizer, batched and seeded."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dalle_core.errors import DalleError
from dalle_core.images import save_image_grid, to_pil
from dalle_train.bundle import Bundle


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise DalleError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DalleError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.batch_size < 1:
            raise DalleError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Generation:
    """``images[i]`` (``float[C, H, W]`` in [0, 1]) was drawn for ``prompts[i]``; ``image_ids`` are its codes."""

    prompts: tuple[str, ...]
    images: torch.Tensor
    image_ids: torch.Tensor
    options: SamplingOptions


@torch.no_grad()
def generate(
    bundle: Bundle, prompts: Sequence[str], n_per_prompt: int = 1, options: SamplingOptions | None = None
) -> Generation:
    """Draw ``n_per_prompt`` images per prompt; the same options and prompts always give the same images."""
    options = options or SamplingOptions()
    if n_per_prompt < 1:
        raise DalleError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if not prompts:
        raise DalleError("expected at least one prompt, got none")
    expanded = [prompt for prompt in prompts for _ in range(n_per_prompt)]
    text_ids = bundle.text_tokenizer.encode(expanded, bundle.model.config.text_seq_len)
    generator = torch.Generator().manual_seed(options.seed)
    ids = []
    for start in range(0, len(expanded), options.batch_size):
        ids.append(
            bundle.model.generate_image_ids(
                text_ids[start : start + options.batch_size],
                temperature=options.temperature,
                top_k=options.top_k,
                generator=generator,
            )
        )
    image_ids = torch.cat(ids)
    step = options.batch_size
    images = torch.cat([bundle.image_tokenizer.decode(image_ids[s : s + step]) for s in range(0, len(image_ids), step)])
    return Generation(tuple(expanded), images, image_ids, options)


def write_generation(generation: Generation, directory: Path, scale: int = 1) -> list[Path]:
    """Write each image as PNG, a ``grid.png`` of all, and ``generations.json`` (prompt, file, options per image)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    paths, records = [], []
    for index, (prompt, image) in enumerate(zip(generation.prompts, generation.images, strict=True)):
        path = directory / "images" / f"{index:04d}.png"
        picture = to_pil(image)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale))
        picture.save(path)
        paths.append(path)
        records.append({"index": index, "prompt": prompt, "file": str(path.relative_to(directory))})
    save_image_grid(generation.images, directory / "grid.png", scale=scale)
    sidecar = {"options": asdict(generation.options), "images": records}
    (directory / "generations.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return paths
