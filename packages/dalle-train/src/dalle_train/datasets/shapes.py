"""The built-in procedural ``shapes`` dataset and the checker that scores generated images of it.

Each image shows one flat shape on a plain black background and is captioned ``"a {size} {colour} {shape} at the
{position}"`` (``"... in the center"`` for the centre), e.g. ``"a large red circle at the top left"``. It is the
project's end-to-end demo: a tiny discrete VAE and transformer learn it on a CPU in minutes, and
:func:`check_image` / :func:`score` read the attributes back from generated images to measure whether the captions
were followed.

Design choices (the renderer and the checker share the attribute tuples below, so they cannot drift apart):

- **Background** is pure black with no noise. A small VAE reconstructs it almost perfectly, and, because black is
  the zero vector, a pixel that mixes a shape colour with the background (anti-aliasing, blur, a blurry decoder) is
  a *scaled* copy of the shape colour: its direction in RGB space -- which is what the checker compares -- is
  unchanged.
- **Colours** are six hues 60 degrees apart on the colour wheel (red, yellow, green, cyan, blue, purple), so the
  nearest palette colour by angle (cosine) stays right even for dark, blurred or slightly off-hue pixels.
- **Shapes** are an axis-aligned circle, square and upward-pointing triangle with the same bounding box. The checker
  tells them apart by moments of the foreground's soft weights that a Gaussian blur leaves unchanged (the third and
  fourth cumulants): the triangle is skewed towards its base, and a square's fourth cumulant along the diagonals is half
  that along the axes, while a circle's is the same in every direction. So they stay readable on blurry images, where
  masks lose corners; an 8-pixel small shape at 32 px is the hardest case.
- **Sizes** are bounding boxes of 24% and 40% of the image side (+-8% jitter): small shapes stay a few VAE tokens wide
  at 32 px, and the checker's estimate of the side (from the foreground's area) has a wide gap at 31%.
- **Positions** are the four quadrant centres plus the image centre. The checker picks the anchor nearest the estimated
  bounding-box centre; anchors are at least 0.35 image sides apart (a decision margin of >= 0.177), while the jitter is
  at most 0.03 per axis, so "center" separates as reliably as the quadrants (100% in the tests, blurred or not). Five
  positions give more compositions to hold out than four, for one more word.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from dalle_core.errors import ConfigError, ShapeError

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "POSITION_ANCHORS",
    "SHAPES",
    "SIZES",
    "SIZE_FRACTIONS",
    "ShapeReading",
    "ShapeSpec",
    "ShapesDataset",
    "all_specs",
    "chance_levels",
    "check_image",
    "parse_caption",
    "render",
    "score",
    "split_specs",
]

# ----------------------------------------------------------------------------------------------------- attributes

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "yellow": (230, 230, 0),
    "green": (0, 230, 0),
    "cyan": (0, 230, 230),
    "blue": (0, 0, 230),
    "purple": (230, 0, 230),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.24, "large": 0.40}
"""Side of the shape's bounding box as a fraction of the image side (before jitter)."""
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
"""``(x, y)`` of the bounding-box centre as fractions of the image side (before jitter)."""
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

POSITION_JITTER = 0.03
"""Largest shift of the shape along each axis, as a fraction of the image side."""
SIZE_JITTER = 0.08
"""Largest relative change of the shape's size."""
_SUPERSAMPLE = 4

# Checker thresholds (see check_image).
_MIN_CONTRAST = 0.15  # RGB distance of the farthest pixel from the background below which there is no foreground
_MASK_LEVEL = 0.5  # the foreground mask holds pixels at >= this fraction of the farthest pixel's distance
_MIN_AREA = 3  # pixels; a smaller largest component means no foreground
_WINDOW_MARGIN = 0.08  # soft weights are summed within the mask's bounding box grown by this fraction of the side
_SOFT_FLOOR = 0.1  # soft weights have this fraction of the interior level subtracted, against noise...
_NOISE_FLOOR = 3.0  # ... or this many (robust) standard deviations of the background noise if that is more
_TRIANGLE_SKEW = 0.4  # triangle ~1, circle and square ~0
_SQUARE_DIAGONAL = 0.75  # square 0.5, circle 1
_BOX_COVERAGE = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # shape area / bounding-box area
_LARGE_SIDE = 0.31  # bounding-box side / image side: small 0.24, large 0.40 (+-8%)


@dataclass(frozen=True)
class ShapeSpec:
    """One combination of attributes; ``caption`` is its text."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise ConfigError(f"ShapeSpec.{field} must be one of {allowed}, got {value!r}")

    @property
    def caption(self) -> str:
        """``"a large red circle at the top left"``; the centre reads ``"... in the center"``."""
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where}"


_CAPTIONS: dict[str, ShapeSpec] = {}


def all_specs() -> list[ShapeSpec]:
    """Every combination of colour, shape, size and position, in a fixed order."""
    return [ShapeSpec(*combo) for combo in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def parse_caption(caption: str) -> ShapeSpec:
    """The :class:`ShapeSpec` whose caption is ``caption`` (whitespace and case are normalised)."""
    if not _CAPTIONS:
        _CAPTIONS.update({spec.caption: spec for spec in all_specs()})
    key = " ".join(caption.lower().split())
    if key not in _CAPTIONS:
        raise ConfigError(f"not a shapes caption (expected e.g. 'a large red circle at the top left'), got {caption!r}")
    return _CAPTIONS[key]


def split_specs(seed: int = 0, holdout_fraction: float = 0.2) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """Split :func:`all_specs` into ``(train_specs, heldout_specs)`` deterministically for ``seed``.

    Held-out specs are whole combinations: their captions never occur in training, yet every single attribute value
    (and so every word) does. Combinations are visited in a seeded random order and held out while the train set keeps
    at least one spec with each attribute value; ``round(holdout_fraction * len(all_specs()))`` are held out (fewer
    only if that constraint binds, which needs a fraction close to 1). Both lists keep :func:`all_specs` order.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
    specs = all_specs()
    target = round(holdout_fraction * len(specs))
    counts: dict[tuple[str, str], int] = {}
    for spec in specs:
        for key in _attribute_keys(spec):
            counts[key] = counts.get(key, 0) + 1
    held: set[int] = set()
    for index in np.random.default_rng(seed).permutation(len(specs)).tolist():
        if len(held) >= target:
            break
        keys = _attribute_keys(specs[index])
        if all(counts[key] > 1 for key in keys):
            held.add(index)
            for key in keys:
                counts[key] -= 1
    train = [spec for index, spec in enumerate(specs) if index not in held]
    heldout = [spec for index, spec in enumerate(specs) if index in held]
    return train, heldout


def _attribute_keys(spec: ShapeSpec) -> tuple[tuple[str, str], ...]:
    return (("colour", spec.colour), ("shape", spec.shape), ("size", spec.size), ("position", spec.position))


# ------------------------------------------------------------------------------------------------------ rendering


def render(spec: ShapeSpec, image_size: int = 32, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``spec`` as an ``image_size`` x ``image_size`` RGB image (anti-aliased by 4x supersampling).

    With ``rng`` the shape is shifted by up to :data:`POSITION_JITTER` of the side along each axis and scaled by up to
    +-:data:`SIZE_JITTER`; without it the canonical picture is drawn.
    """
    if image_size < 8:
        raise ConfigError(f"image_size must be at least 8, got {image_size}")
    if rng is None:
        dx = dy = 0.0
        scale = 1.0
    else:
        dx, dy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2).tolist()
        scale = float(rng.uniform(1.0 - SIZE_JITTER, 1.0 + SIZE_JITTER))
    big = image_size * _SUPERSAMPLE
    anchor_x, anchor_y = POSITION_ANCHORS[spec.position]
    cx, cy = (anchor_x + dx) * big, (anchor_y + dy) * big
    half = SIZE_FRACTIONS[spec.size] * scale * big / 2
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    fill = COLOUR_RGB[spec.colour]
    # PIL's rectangle and ellipse boxes are inclusive: the last pixel drawn is x1 - 1.
    box = (round(x0), round(y0), round(x1) - 1, round(y1) - 1)
    if spec.shape == "square":
        draw.rectangle(box, fill=fill)
    elif spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


class ShapesDataset(torch.utils.data.Dataset):
    """``samples_per_spec`` jittered renderings of each spec, precomputed once as ``uint8``.

    Item ``i`` shows ``specs[i // samples_per_spec]``; its jitter comes from ``numpy.random.default_rng((seed, i))``,
    so an item depends only on ``(specs, samples_per_spec, image_size, seed, i)``. ``__getitem__`` returns
    ``(float32[3, image_size, image_size] in [0, 1], caption)``.
    """

    def __init__(self, specs: Sequence[ShapeSpec], samples_per_spec: int, image_size: int = 32, seed: int = 0) -> None:
        if len(specs) == 0:
            raise ConfigError("ShapesDataset needs at least one spec, got none")
        if samples_per_spec < 1:
            raise ConfigError(f"samples_per_spec must be >= 1, got {samples_per_spec}")
        self.specs: list[ShapeSpec] = list(specs)
        self.samples_per_spec = samples_per_spec
        self.image_size = image_size
        self.seed = seed
        count = len(self.specs) * samples_per_spec
        pixels = np.empty((count, image_size, image_size, 3), dtype=np.uint8)
        for index in range(count):
            rng = np.random.default_rng((seed, index))
            pixels[index] = np.asarray(render(self.spec(index), image_size, rng))
        self.images: torch.Tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        """``uint8[N, 3, H, W]``: every image, for callers that batch it themselves."""
        self.captions: list[str] = [self.spec(index).caption for index in range(count)]

    def spec(self, index: int) -> ShapeSpec:
        """The spec shown by item ``index``."""
        return self.specs[index // self.samples_per_spec]

    def __len__(self) -> int:
        return len(self.specs) * self.samples_per_spec

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index].float().div_(255.0), self.captions[index]


# -------------------------------------------------------------------------------------------------------- checker


@dataclass(frozen=True)
class ShapeReading:
    """The attributes :func:`check_image` read from an image; all ``None`` when no foreground was found."""

    colour: str | None
    shape: str | None
    size: str | None
    position: str | None


_EMPTY = ShapeReading(None, None, None, None)
_PALETTE_DIRECTIONS = np.array([COLOUR_RGB[name] for name in COLOURS], dtype=np.float64) - np.array(BACKGROUND)
_PALETTE_DIRECTIONS /= np.linalg.norm(_PALETTE_DIRECTIONS, axis=1, keepdims=True)
_ANCHORS = np.array([POSITION_ANCHORS[name] for name in POSITIONS], dtype=np.float64)


def _to_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    if array.ndim != 3 or array.shape[0] != 3 or array.shape[1] < 4 or array.shape[2] < 4:
        raise ShapeError(f"expected an image float[3, H, W] in [0, 1], got shape {tuple(array.shape)}")
    return np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0).transpose(1, 2, 0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask, as a boolean mask."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for start_y, start_x in zip(*np.nonzero(mask), strict=True):
        if labels[start_y, start_x]:
            continue
        label += 1
        labels[start_y, start_x] = label
        size = 0
        queue = deque([(int(start_y), int(start_x))])
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny in (y - 1, y, y + 1):
                if ny < 0 or ny >= height:
                    continue
                for nx in (x - 1, x, x + 1):
                    if 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _features(image: torch.Tensor | np.ndarray) -> dict[str, float] | None:
    """The measurements :func:`check_image` classifies, or ``None`` when there is no foreground."""
    pixels = _to_array(image)
    height, width, _ = pixels.shape
    offset = pixels - np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(offset, axis=2)
    peak = float(distance.max())
    if peak < _MIN_CONTRAST:
        return None
    mask = _largest_component(distance >= _MASK_LEVEL * peak)
    if int(mask.sum()) < _MIN_AREA:
        return None
    mean_offset = offset[mask].mean(axis=0)
    # Soft foreground weights: each pixel's offset along the shape's colour, so blurred edges count fractionally and
    # zero-mean noise mostly cancels; the small floor removes what noise survives. Only a window around the mask counts.
    projection = offset @ (mean_offset / max(float(np.linalg.norm(mean_offset)), 1e-8))
    level = float(np.percentile(projection[mask], 75))
    ys, xs = np.nonzero(mask)
    margin = max(2, round(_WINDOW_MARGIN * max(height, width)))
    y0, y1 = max(0, int(ys.min()) - margin), min(height, int(ys.max()) + 1 + margin)
    x0, x1 = max(0, int(xs.min()) - margin), min(width, int(xs.max()) + 1 + margin)
    noise = 1.4826 * float(np.median(np.abs(projection - np.median(projection))))  # robust std, background-dominated
    floor = min(max(_SOFT_FLOOR * level, _NOISE_FLOOR * noise), 0.5 * level)
    weights = np.clip(projection[y0:y1, x0:x1] - floor, 0.0, None)
    mass = float(weights.sum())
    if level <= 0 or mass <= 1e-8:
        return None
    grid_y, grid_x = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5  # pixel centres
    cx, cy = float((weights * grid_x).sum()) / mass, float((weights * grid_y).sum()) / mass
    dx, dy = grid_x - cx, grid_y - cy

    def cumulants(axis: np.ndarray) -> tuple[float, float]:
        """Third and fourth cumulants of the weights along ``axis``: a Gaussian blur leaves both unchanged."""
        m2, m3, m4 = (float((weights * axis**power).sum()) / mass for power in (2, 3, 4))
        return m3, m4 - 3 * m2 * m2

    _, k4x = cumulants(dx)
    k3y, k4y = cumulants(dy)
    _, k4u = cumulants((dx + dy) / math.sqrt(2))
    _, k4v = cumulants((dx - dy) / math.sqrt(2))
    axis_k4 = (k4x + k4y) / 2
    return {
        "colour": int(np.argmax(_PALETTE_DIRECTIONS @ mean_offset)),
        # Fraction of the image side that a square of the same area would span: mass / level is the area in pixels.
        "area_side": math.sqrt(mass / (level - floor) / (height * width)),
        # y-skewness made scale-free with the 4th cumulant: ~1 for an upward triangle, 0 for circle and square.
        "skew": -k3y / max(abs(axis_k4), 1e-12) ** 0.75,
        # 4th cumulant along the diagonals vs along the axes: 1 for a circle (isotropic), 1/2 for a square.
        "diagonal": (k4u + k4v) / 2 / min(axis_k4, -1e-12),
        "x": cx / width,
        "y": cy / height,
    }


def check_image(image: torch.Tensor | np.ndarray) -> ShapeReading:
    """Read colour, shape, size and position back from ``float[3, H, W]`` in ``[0, 1]`` (``uint8`` is scaled).

    - *Foreground*: the background is the per-channel median (a shape covers well under half the image); the shape is
      the largest 8-connected component of pixels at least half as far from it (in RGB) as the farthest pixel. An
      image whose farthest pixel is within 0.15 of the background has no foreground and reads as all ``None``.
    - *Colour*: the palette colour closest in angle to the mean foreground offset from the background.
    - The remaining attributes use soft weights (each pixel's offset along that colour, near the component), whose
      moments are robust to blur: *shape* is a triangle if the weights are skewed towards the bottom (scale-free
      skewness > 0.4, ~1 for a triangle, ~0 otherwise), else a square if their 4th cumulant along the diagonals is
      under 0.75 of that along the axes (square 0.5, circle 1), else a circle.
    - *Size*: the side of the shape's bounding box, from its area (total weight / interior level) and the area that
      shape covers of its box (1, pi/4, 1/2), is large above 30% of the image side (small ~22%, large ~40%).
    - *Position*: the anchor nearest the bounding-box centre (the centroid, moved up by a sixth of the side for a
      triangle, whose centroid lies below its box centre).
    """
    features = _features(image)
    if features is None:
        return _EMPTY
    if features["skew"] > _TRIANGLE_SKEW:
        shape = "triangle"
    elif features["diagonal"] < _SQUARE_DIAGONAL:
        shape = "square"
    else:
        shape = "circle"
    side = features["area_side"] / math.sqrt(_BOX_COVERAGE[shape])
    centre = np.array([features["x"], features["y"] - (side / 6 if shape == "triangle" else 0.0)])
    return ShapeReading(
        colour=COLOURS[int(features["colour"])],
        shape=shape,
        size="large" if side > _LARGE_SIDE else "small",
        position=POSITIONS[int(np.argmin(np.linalg.norm(_ANCHORS - centre, axis=1)))],
    )


def score(images: torch.Tensor | Sequence[torch.Tensor], specs: Sequence[ShapeSpec]) -> dict[str, float]:
    """Per-attribute accuracy of :func:`check_image` on ``images`` against the ``specs`` they were generated for.

    ``images`` is ``float[B, 3, H, W]`` in ``[0, 1]`` or a sequence of ``float[3, H, W]``. Returns ``"colour"``,
    ``"shape"``, ``"size"``, ``"position"`` and ``"all"`` (every attribute right), each in ``[0, 1]``; an unread
    attribute (``None``) counts as wrong.
    """
    if len(images) != len(specs):
        raise ShapeError(f"score needs one spec per image, got {len(images)} images and {len(specs)} specs")
    if len(specs) == 0:
        raise ShapeError("score needs at least one image, got none")
    names = ("colour", "shape", "size", "position")
    correct = dict.fromkeys((*names, "all"), 0)
    for image, spec in zip(images, specs, strict=True):
        reading = check_image(image)
        right = [getattr(reading, name) == getattr(spec, name) for name in names]
        for name, ok in zip(names, right, strict=True):
            correct[name] += ok
        correct["all"] += all(right)
    return {name: count / len(specs) for name, count in correct.items()}


def chance_levels() -> dict[str, float]:
    """Accuracy of uniform guessing: ``1 / len`` of each attribute tuple, and their product for ``"all"``."""
    levels = {
        "colour": 1 / len(COLOURS),
        "shape": 1 / len(SHAPES),
        "size": 1 / len(SIZES),
        "position": 1 / len(POSITIONS),
    }
    levels["all"] = math.prod(levels.values())
    return levels
