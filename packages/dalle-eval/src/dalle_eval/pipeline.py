"""Text in, images out: tokenizer -> transformer -> image tokenizer, batched and seeded.

Seeding. With one ``torch.Generator`` per call, the random numbers a row of a batch receives depend on the rows
before it. Two scopes:

- ``seed_scope="image"`` (default): image ``s`` of a prompt is drawn by its own generator, seeded with
  :func:`image_seed` ``(seed, prompt, s)``. An image therefore depends only on the model, the prompt text, the run
  seed, its sample index and the sampling options: not on ``batch_size``, on ``n_per_prompt`` (the first 4 of 8
  images are the 4 of a run with ``n_per_prompt=4``), nor on the other prompts or their order. When the transformer's
  ``generate_image_ids`` takes ``row_generators`` (one generator per row), rows are still sampled ``batch_size`` at a
  time (identical up to float rounding of the batched forward pass, which can flip a draw only on a near-tie);
  otherwise each image is one call, which costs batching (about 7x slower for the demo's model on one CPU thread).
- ``seed_scope="batch"``: rows are sampled ``batch_size`` at a time from one generator seeded with ``seed``. The
  images are reproducible for the same prompts, seed and ``batch_size``, but change with any of them.

Decoding to pixels is batched in both scopes (the decoder is deterministic).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dalle_core.errors import ConfigError, DalleError, ShapeError
from dalle_core.images import save_image_grid, to_pil
from dalle_train.bundle import Bundle, load_bundle

SeedScope = Literal["image", "batch"]


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 16
    seed_scope: SeedScope = "image"

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise DalleError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DalleError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.batch_size < 1:
            raise DalleError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise DalleError(f"seed must be >= 0, got {self.seed}")
        if self.seed_scope not in ("image", "batch"):
            raise ConfigError(f"seed_scope must be 'image' or 'batch', got {self.seed_scope!r}")


@dataclass(frozen=True)
class Generation:
    """``images[i]`` (``float[C, H, W]`` in [0, 1]) was drawn for ``prompts[i]``; ``image_ids`` are its codes.

    ``prompt_indices[i]`` / ``sample_indices[i]`` say which prompt and which of its samples image ``i`` is, and
    ``seeds[i]`` seeded the generator that drew it (with ``seed_scope="batch"`` one generator, seeded with
    ``options.seed``, drew every image). ``scores`` is set by reranking: the score of each image, higher is better.
    """

    prompts: tuple[str, ...]
    images: torch.Tensor
    image_ids: torch.Tensor
    options: SamplingOptions
    prompt_indices: tuple[int, ...] = ()
    sample_indices: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    scores: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        count = len(self.prompts)
        for name in ("prompt_indices", "sample_indices", "seeds"):
            if getattr(self, name) and len(getattr(self, name)) != count:
                raise ShapeError(
                    f"Generation.{name} needs one entry per image ({count}), got {len(getattr(self, name))}"
                )
        if self.scores is not None and len(self.scores) != count:
            raise ShapeError(f"Generation.scores needs one entry per image ({count}), got {len(self.scores)}")
        if self.images.shape[0] != count or self.image_ids.shape[0] != count:
            raise ShapeError(
                f"Generation needs one image and one id row per prompt ({count}), got {self.images.shape[0]} images "
                f"and {self.image_ids.shape[0]} id rows"
            )

    def select(self, indices: Sequence[int], scores: Sequence[float] | None = None) -> Generation:
        """The images at ``indices``, in that order (optionally with new ``scores``)."""
        index = list(indices)

        def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[i] for i in index) if values else ()

        kept_scores = tuple(float(s) for s in scores) if scores is not None else None
        if kept_scores is None and self.scores is not None:
            kept_scores = pick(self.scores)
        return Generation(
            prompts=pick(self.prompts),
            images=self.images[index],
            image_ids=self.image_ids[index],
            options=self.options,
            prompt_indices=pick(self.prompt_indices),
            sample_indices=pick(self.sample_indices),
            seeds=pick(self.seeds),
            scores=kept_scores,
        )

    def images_per_prompt(self) -> int | None:
        """How many images each prompt has, or ``None`` when prompts have different counts."""
        counts = set(Counter(self.prompt_indices or self.prompts).values())
        return counts.pop() if len(counts) == 1 else None


def image_seed(seed: int, prompt: str, sample_index: int) -> int:
    """The generator seed of sample ``sample_index`` of ``prompt`` in a run seeded with ``seed`` (a 32-bit int).

    Mixed with numpy's ``SeedSequence`` so nearby seeds and indices give unrelated streams; the prompt enters through
    the first 8 bytes of its SHA-256, so the value is the same in every process and on every machine.
    """
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    words = [seed, digest & 0xFFFFFFFF, digest >> 32, sample_index]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint32)[0])


def _takes_row_generators(model: Any) -> bool:
    """Whether ``model.generate_image_ids`` accepts ``row_generators`` (one generator per row of a batch)."""
    try:
        return "row_generators" in inspect.signature(model.generate_image_ids).parameters
    except (TypeError, ValueError):
        return False


def device_of(module: Any) -> torch.device:
    """The device of a module's first parameter (the CPU for parameter-less modules and non-modules)."""
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def generate(
    bundle: Bundle | str | Path,
    prompts: Sequence[str],
    n_per_prompt: int = 1,
    options: SamplingOptions | None = None,
) -> Generation:
    """Draw ``n_per_prompt`` images per prompt from a bundle (or a checkpoint directory holding one).

    The same model, prompts and options always give the same images; see the module docstring for what else an image
    depends on under each ``seed_scope``. Images are ordered prompt by prompt.
    """
    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    options = options or SamplingOptions()
    if n_per_prompt < 1:
        raise DalleError(f"n_per_prompt must be >= 1, got {n_per_prompt}")
    if isinstance(prompts, str):
        raise DalleError(f"expected a list of prompts, got the string {prompts!r}")
    if not prompts:
        raise DalleError("expected at least one prompt, got none")
    expanded = [prompt for prompt in prompts for _ in range(n_per_prompt)]
    prompt_indices = tuple(p for p in range(len(prompts)) for _ in range(n_per_prompt))
    sample_indices = tuple(s for _ in prompts for s in range(n_per_prompt))
    text_ids = bundle.text_tokenizer.encode(expanded, bundle.model.config.text_seq_len)
    text_ids = text_ids.to(device_of(bundle.model))

    def sample(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return bundle.model.generate_image_ids(
            rows, temperature=options.temperature, top_k=options.top_k, generator=generator
        ).cpu()

    def sample_rows(rows: torch.Tensor, row_seeds: Sequence[int]) -> torch.Tensor:
        return bundle.model.generate_image_ids(
            rows,
            temperature=options.temperature,
            top_k=options.top_k,
            row_generators=[torch.Generator().manual_seed(seed) for seed in row_seeds],
        ).cpu()

    if options.seed_scope == "image":
        seeds = tuple(image_seed(options.seed, p, s) for p, s in zip(expanded, sample_indices, strict=True))
        if _takes_row_generators(bundle.model):
            step = options.batch_size
            rows = [
                sample_rows(text_ids[start : start + step], seeds[start : start + step])
                for start in range(0, len(expanded), step)
            ]
        else:
            rows = [sample(text_ids[i : i + 1], torch.Generator().manual_seed(seeds[i])) for i in range(len(expanded))]
    else:
        seeds = (options.seed,) * len(expanded)
        generator = torch.Generator().manual_seed(options.seed)
        step = options.batch_size
        rows = [sample(text_ids[start : start + step], generator) for start in range(0, len(expanded), step)]
    image_ids = torch.cat(rows)
    images = decode_images(bundle, image_ids, options.batch_size)
    return Generation(tuple(expanded), images, image_ids, options, prompt_indices, sample_indices, seeds)


@torch.no_grad()
def decode_images(bundle: Bundle, image_ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Image ids -> ``float[N, C, H, W]`` in [0, 1] on the CPU, ``batch_size`` at a time."""
    device = device_of(bundle.image_tokenizer)
    chunks = [
        bundle.image_tokenizer.decode(image_ids[start : start + batch_size].to(device)).float().cpu()
        for start in range(0, len(image_ids), batch_size)
    ]
    return torch.cat(chunks).clamp(0, 1)


def write_generation(
    generation: Generation, directory: Path, scale: int = 1, metadata: Mapping[str, Any] | None = None
) -> list[Path]:
    """Write each image as PNG, ``grid.png`` (one row per prompt when they have equal counts) and ``generations.json``.

    ``generations.json`` holds the run's options and ``metadata`` (e.g. the checkpoint) once, and for every image its
    file, prompt, prompt and sample index, the seed of its generator and the sampling options, so one image can be
    traced and redrawn on its own. Returns the image paths in order.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "images").mkdir(exist_ok=True)
    options = generation.options
    paths, records = [], []
    for index, (prompt, image) in enumerate(zip(generation.prompts, generation.images, strict=True)):
        path = directory / "images" / f"{index:04d}.png"
        picture = to_pil(image)
        if scale > 1:
            picture = picture.resize((picture.width * scale, picture.height * scale))
        picture.save(path)
        paths.append(path)
        record: dict[str, Any] = {
            "index": index,
            "file": path.relative_to(directory).as_posix(),
            "prompt": prompt,
            "prompt_index": generation.prompt_indices[index] if generation.prompt_indices else None,
            "sample_index": generation.sample_indices[index] if generation.sample_indices else None,
            "seed": generation.seeds[index] if generation.seeds else None,
            "seed_scope": options.seed_scope,
            "temperature": options.temperature,
            "top_k": options.top_k,
        }
        if generation.scores is not None:
            record["score"] = generation.scores[index]
        records.append(record)
    per_prompt = generation.images_per_prompt()
    nrow = per_prompt if per_prompt and per_prompt > 1 else None  # one row per prompt, unless that is one column
    save_image_grid(generation.images, directory / "grid.png", nrow=nrow, scale=scale)
    sidecar = {"options": asdict(options), "metadata": dict(metadata or {}), "images": records}
    (directory / "generations.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return paths
