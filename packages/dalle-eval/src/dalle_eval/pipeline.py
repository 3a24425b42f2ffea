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

Beyond temperature and top-k, :class:`SamplingOptions` carries top-p and classifier-free guidance (``cond_scale``;
1 means none, and then no null-text rows are run). :func:`generate` can also start every image from the first codes
of one image (:class:`Priming`, e.g. :func:`load_priming_image`) and report partial images while sampling (a
:data:`GenerationProgress` callback such as :class:`ProgressPreviews`). None of these changes how seeds are drawn.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from dalle_core.errors import ConfigError, DalleError, DataError, ShapeError
from dalle_core.images import from_pil, save_image_grid, to_pil
from dalle_train.bundle import Bundle, load_bundle

SeedScope = Literal["image", "batch"]
# (step, image indices, ids): ``ids`` (``int64[len(indices), step]``, on the CPU) are the first ``step`` image codes
# known so far of the images at ``indices`` (positions in the generation's prompt-major order).
GenerationProgress = Callable[[int, tuple[int, ...], torch.Tensor], object]
IMAGE_IDS_FILE = "image_ids.npy"
# DALLE-pytorch's default share of a whole image kept when priming (OpenAI's 14 of 32 rows).
DEFAULT_PRIMING_FRACTION = 0.4375


@dataclass(frozen=True)
class SamplingOptions:
    """How image codes are drawn: ``top_k`` keeps the k most likely codes, ``top_p`` the nucleus of that much
    probability, ``cond_scale`` is classifier-free guidance (1: none), then ``temperature``; see the module doc for
    ``seed``, ``seed_scope`` and ``batch_size``."""

    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 16
    seed_scope: SeedScope = "image"
    top_p: float | None = None
    cond_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise DalleError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise DalleError(f"top_k must be >= 1 or unset, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise DalleError(f"top_p must be in (0, 1] or unset, got {self.top_p}")
        if isinstance(self.cond_scale, bool) or not math.isfinite(self.cond_scale) or self.cond_scale < 0:
            raise DalleError(f"cond_scale must be a finite number >= 0 (1: no guidance), got {self.cond_scale}")
        if self.batch_size < 1:
            raise DalleError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise DalleError(f"seed must be >= 0, got {self.seed}")
        if self.seed_scope not in ("image", "batch"):
            raise ConfigError(f"seed_scope must be 'image' or 'batch', got {self.seed_scope!r}")


@dataclass(frozen=True)
class Priming:
    """Start every image from the first ``num_tokens`` of ``image_ids`` (one image's codes, ``int64[k]``, e.g. the
    image tokenizer's encoding of a picture); the remaining codes are sampled. ``source`` names where the codes came
    from (a file), for the record."""

    image_ids: torch.Tensor
    num_tokens: int
    source: str | None = None

    def __post_init__(self) -> None:
        ids = self.image_ids
        if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            found = f"{ids.dtype} tensor of shape {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
            raise ShapeError(f"Priming.image_ids: expected one image's codes as an integer tensor [k], got {found}")
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int):
            raise ConfigError(f"priming tokens: expected an integer, got {self.num_tokens!r}")
        if not 0 <= self.num_tokens <= len(ids):
            raise ConfigError(f"priming tokens: expected 0 to {len(ids)} (the codes given), got {self.num_tokens}")

    @property
    def kept_ids(self) -> torch.Tensor:
        """The codes every image starts with, ``int64[num_tokens]``."""
        return self.image_ids[: self.num_tokens].long().cpu()

    def record(self) -> dict[str, Any]:
        """What ``generations.json`` says about the priming (enough to redraw an image)."""
        return {"num_tokens": self.num_tokens, "source": self.source, "image_ids": self.kept_ids.tolist()}


@dataclass(frozen=True)
class Generation:
    """``images[i]`` (``float[C, H, W]`` in [0, 1]) was drawn for ``prompts[i]``; ``image_ids`` are its codes.

    ``prompt_indices[i]`` / ``sample_indices[i]`` say which prompt and which of its samples image ``i`` is, and
    ``seeds[i]`` seeded the generator that drew it (with ``seed_scope="batch"`` one generator, seeded with
    ``options.seed``, drew every image). ``scores`` is set by reranking: the score of each image, higher is better.
    ``priming``: the codes every image started from, if any.
    """

    prompts: tuple[str, ...]
    images: torch.Tensor
    image_ids: torch.Tensor
    options: SamplingOptions
    prompt_indices: tuple[int, ...] = ()
    sample_indices: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    scores: tuple[float, ...] | None = None
    priming: Priming | None = None

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
            priming=self.priming,
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
    *,
    priming: Priming | None = None,
    progress: GenerationProgress | None = None,
    progress_every: int = 1,
) -> Generation:
    """Draw ``n_per_prompt`` images per prompt from a bundle (or a checkpoint directory holding one).

    The same model, prompts and options always give the same images; see the module docstring for what else an image
    depends on under each ``seed_scope``. Images are ordered prompt by prompt. ``priming`` starts every image from
    the same codes; ``progress(step, indices, ids)`` is called every ``progress_every`` sampled codes (and after the
    last) for each batch of rows, with the codes known so far (see :data:`GenerationProgress`).
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
    if isinstance(progress_every, bool) or not isinstance(progress_every, int) or progress_every < 1:
        raise ConfigError(f"progress_every: expected a positive integer, got {progress_every!r}")
    if priming is not None and priming.num_tokens >= bundle.model.config.image_seq_len:
        raise ConfigError(
            f"priming tokens: expected fewer than the {bundle.model.config.image_seq_len} codes of an image, got "
            f"{priming.num_tokens}"
        )
    expanded = [prompt for prompt in prompts for _ in range(n_per_prompt)]
    prompt_indices = tuple(p for p in range(len(prompts)) for _ in range(n_per_prompt))
    sample_indices = tuple(s for _ in prompts for s in range(n_per_prompt))
    device = device_of(bundle.model)
    text_ids = bundle.text_tokenizer.encode(expanded, bundle.model.config.text_seq_len).to(device)

    def sample(start: int, count: int, **seeding: Any) -> torch.Tensor:
        """Rows ``start .. start + count`` (``seeding``: ``generator=`` or ``row_generators=``)."""
        # Options at their defaults are left out, so a model whose generate_image_ids lacks them still works.
        extra: dict[str, Any] = {}
        if options.top_p is not None:
            extra["top_p"] = options.top_p
        if options.cond_scale != 1:
            extra["cond_scale"] = options.cond_scale
        if priming is not None and priming.num_tokens > 0:
            extra["init_image_ids"] = priming.kept_ids.to(device).expand(count, -1)
            extra["num_init_img_tokens"] = priming.num_tokens
        if progress is not None:
            indices = tuple(range(start, start + count))
            extra["callback"] = lambda step, ids: progress(step, indices, ids.cpu())
            extra["callback_every"] = progress_every
        return bundle.model.generate_image_ids(
            text_ids[start : start + count],
            temperature=options.temperature,
            top_k=options.top_k,
            **seeding,
            **extra,
        ).cpu()

    total, step = len(expanded), options.batch_size
    if options.seed_scope == "image":
        seeds = tuple(image_seed(options.seed, p, s) for p, s in zip(expanded, sample_indices, strict=True))
        if _takes_row_generators(bundle.model):
            rows = [
                sample(
                    start,
                    min(step, total - start),
                    row_generators=[torch.Generator().manual_seed(seed) for seed in seeds[start : start + step]],
                )
                for start in range(0, total, step)
            ]
        else:
            rows = [sample(i, 1, generator=torch.Generator().manual_seed(seeds[i])) for i in range(total)]
    else:
        seeds = (options.seed,) * total
        generator = torch.Generator().manual_seed(options.seed)
        rows = [sample(start, min(step, total - start), generator=generator) for start in range(0, total, step)]
    image_ids = torch.cat(rows)
    images = decode_images(bundle, image_ids, options.batch_size)
    return Generation(
        tuple(expanded), images, image_ids, options, prompt_indices, sample_indices, seeds, priming=priming
    )


def encode_priming_image(
    bundle: Bundle, image: torch.Tensor, num_tokens: int | None = None, source: str | None = None
) -> Priming:
    """:class:`Priming` from one image (``float[C, H, W]`` in [0, 1] at the image tokenizer's size): its codes, of
    which the first ``num_tokens`` are kept (default: DALLE-pytorch's ``int(0.4375 * image_seq_len)``)."""
    tokenizer = bundle.image_tokenizer
    expected = (tokenizer.channels, tokenizer.image_size, tokenizer.image_size)
    if image.ndim != 3 or tuple(image.shape) != expected:
        raise ShapeError(f"expected a priming image of shape {list(expected)}, got {list(image.shape)}")
    codes = tokenizer.encode(image.unsqueeze(0).to(device_of(tokenizer))).cpu()[0]
    if num_tokens is None:
        num_tokens = int(DEFAULT_PRIMING_FRACTION * len(codes))
    return Priming(codes, num_tokens, source)


def load_priming_image(bundle: Bundle, path: str | Path, num_tokens: int | None = None) -> Priming:
    """:func:`encode_priming_image` of a picture file, centre-cropped and resized to the image tokenizer's size."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"priming image not found: {path}")
    try:
        with Image.open(path) as picture:
            image = from_pil(picture, bundle.image_tokenizer.image_size)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"cannot read priming image {path}: {str(error).splitlines()[0]}") from None
    if bundle.image_tokenizer.channels == 1:
        image = image.mean(dim=0, keepdim=True)
    return encode_priming_image(bundle, image, num_tokens, str(path))


PREVIEW_GREY = 0.5


@torch.no_grad()
def decode_partial(bundle: Bundle, ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Preview images of partly sampled codes ``int[B, k]`` (the first ``k`` of each image, row-major).

    The unknown positions are decoded as code 0 (a placeholder the decoder needs) and their patches of the picture
    are then painted mid-grey (:data:`PREVIEW_GREY`), so a preview shows exactly the part of the image drawn so far.
    Near the edge of the known part the decoder's receptive field mixes in a little of the placeholder.
    """
    config = bundle.model.config
    side, count = config.image_fmap_size, config.image_seq_len
    if ids.ndim != 2 or ids.shape[1] > count:
        raise ShapeError(f"expected partial image ids [batch, <= {count}], got shape {list(ids.shape)}")
    known = ids.shape[1]
    full = torch.zeros(ids.shape[0], count, dtype=torch.long)
    full[:, :known] = ids.cpu()
    images = decode_images(bundle, full, batch_size)
    height, width = images.shape[-2] // side, images.shape[-1] // side
    for position in range(known, count):
        row, col = divmod(position, side)
        images[:, :, row * height : (row + 1) * height, col * width : (col + 1) * width] = PREVIEW_GREY
    return images


class ProgressPreviews:
    """A :data:`GenerationProgress` callback that writes ``DIRECTORY/IMAGE-step-STEP.png`` for every image at every
    report: ``IMAGE`` is the image's position in the generation (4 digits, prompt-major, candidates before any
    reranking), ``STEP`` the number of codes known (4 digits). See :func:`decode_partial` for unknown positions."""

    def __init__(self, bundle: Bundle, directory: str | Path, scale: int = 1) -> None:
        self.bundle = bundle
        self.directory = Path(directory)
        self.scale = scale
        self.paths: list[Path] = []

    def __call__(self, step: int, indices: tuple[int, ...], ids: torch.Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for index, image in zip(indices, decode_partial(self.bundle, ids), strict=True):
            picture = to_pil(image)
            if self.scale > 1:
                picture = picture.resize((picture.width * self.scale, picture.height * self.scale))
            path = self.directory / f"{index:04d}-step-{step:04d}.png"
            picture.save(path)
            self.paths.append(path)


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

    ``generations.json`` holds the run's options, the priming codes (if any) and ``metadata`` (e.g. the checkpoint)
    once, and for every image its file, prompt, prompt and sample index, the seed of its generator and the sampling
    options, so one image can be traced and redrawn on its own. ``image_ids.npy`` holds every image's codes
    (``int32[N, image_seq_len]``, in the order of ``generations.json``). Returns the image paths in order.
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
            "top_p": options.top_p,
            "cond_scale": options.cond_scale,
            "priming_tokens": generation.priming.num_tokens if generation.priming is not None else None,
        }
        if generation.scores is not None:
            record["score"] = generation.scores[index]
        records.append(record)
    per_prompt = generation.images_per_prompt()
    nrow = per_prompt if per_prompt and per_prompt > 1 else None  # one row per prompt, unless that is one column
    save_image_grid(generation.images, directory / "grid.png", nrow=nrow, scale=scale)
    # The codes themselves, compactly: what an image was drawn as, before the decoder (int32 [N, image_seq_len]).
    np.save(directory / IMAGE_IDS_FILE, generation.image_ids.cpu().numpy().astype(np.int32))
    sidecar = {
        "options": asdict(options),
        "image_ids_file": IMAGE_IDS_FILE,
        "priming": generation.priming.record() if generation.priming is not None else None,
        "metadata": dict(metadata or {}),
        "images": records,
    }
    (directory / "generations.json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return paths
