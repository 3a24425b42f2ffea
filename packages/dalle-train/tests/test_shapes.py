"""The procedural shapes dataset and its checker: grammar, split, determinism, and that the checker reads and fails."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from dalle_core.errors import ConfigError, ShapeError
from dalle_core.images import from_pil
from dalle_train.datasets.shapes import (
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeReading,
    ShapesDataset,
    ShapeSpec,
    all_specs,
    chance_levels,
    check_image,
    parse_caption,
    render,
    score,
    split_specs,
)

ATTRIBUTES = ("colour", "shape", "size", "position")


def _degraded(specs: list[ShapeSpec], image_size: int, radius: float, noise: float, seed: int) -> torch.Tensor:
    """Jittered renderings of ``specs``, Gaussian-blurred (PIL radius) and with additive Gaussian noise, clamped."""
    rng = np.random.default_rng(seed)
    images = []
    for spec in specs:
        picture = render(spec, image_size, rng).filter(ImageFilter.GaussianBlur(radius))
        tensor = from_pil(picture) + torch.from_numpy(rng.normal(0.0, noise, (3, image_size, image_size))).float()
        images.append(tensor.clamp(0, 1))
    return torch.stack(images)


# ------------------------------------------------------------------------------------------ attributes and captions


def test_caption_grammar_is_exact():
    assert ShapeSpec("red", "circle", "large", "top left").caption == "a large red circle at the top left"
    assert ShapeSpec("blue", "triangle", "small", "center").caption == "a small blue triangle in the center"
    assert ShapeSpec("purple", "square", "small", "bottom right").caption == "a small purple square at the bottom right"


def test_attribute_lists_and_chance_levels():
    assert COLOURS == ("red", "yellow", "green", "cyan", "blue", "purple")
    assert SHAPES == ("circle", "square", "triangle")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("top left", "top right", "bottom left", "bottom right", "center")
    levels = chance_levels()
    assert levels == pytest.approx({"colour": 1 / 6, "shape": 1 / 3, "size": 1 / 2, "position": 1 / 5, "all": 1 / 180})


def test_palette_hues_are_far_apart():
    directions = np.array([COLOUR_RGB[name] for name in COLOURS], dtype=float)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cosines = directions @ directions.T
    angles = np.degrees(np.arccos(np.clip(cosines[~np.eye(len(COLOURS), dtype=bool)], -1, 1)))
    assert angles.min() >= 45.0 - 1e-6  # neighbouring hues (red, yellow) are 45 degrees apart in RGB space


def test_all_specs_and_parse_caption_round_trip():
    specs = all_specs()
    assert len(specs) == len(set(specs)) == 6 * 3 * 2 * 5 == 180
    assert len({spec.caption for spec in specs}) == 180
    assert all(parse_caption(spec.caption) == spec for spec in specs)
    assert parse_caption("  A large RED circle at the  top left ") == ShapeSpec("red", "circle", "large", "top left")
    with pytest.raises(ConfigError, match="not a shapes caption"):
        parse_caption("a large red circle at the top")


def test_spec_rejects_unknown_values():
    with pytest.raises(ConfigError, match="colour must be one of"):
        ShapeSpec("pink", "circle", "large", "top left")
    with pytest.raises(ConfigError, match="position"):
        ShapeSpec("red", "circle", "large", "middle")


# ------------------------------------------------------------------------------------------------------------ split


def test_split_specs_holds_out_unseen_compositions():
    train, heldout = split_specs(seed=0, holdout_fraction=0.2)
    assert len(heldout) == 36 and len(train) == 144
    assert set(train).isdisjoint(heldout)
    assert set(train) | set(heldout) == set(all_specs())
    assert not {spec.caption for spec in heldout} & {spec.caption for spec in train}
    for attribute, values in zip(ATTRIBUTES, (COLOURS, SHAPES, SIZES, POSITIONS), strict=True):
        assert {getattr(spec, attribute) for spec in train} == set(values)
    train_words = {word for spec in train for word in spec.caption.split()}
    assert {word for spec in heldout for word in spec.caption.split()} <= train_words


def test_split_specs_is_deterministic_and_seeded():
    assert split_specs(3, 0.25) == split_specs(3, 0.25)
    assert split_specs(3, 0.25)[1] != split_specs(4, 0.25)[1]
    assert split_specs(0, 0.0) == (all_specs(), [])


def test_split_specs_keeps_every_value_even_when_holding_out_most():
    train, heldout = split_specs(seed=1, holdout_fraction=0.99)
    for attribute, values in zip(ATTRIBUTES, (COLOURS, SHAPES, SIZES, POSITIONS), strict=True):
        assert {getattr(spec, attribute) for spec in train} == set(values)
    assert len(train) + len(heldout) == 180 and len(train) <= 12


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_specs_rejects_bad_fractions(fraction):
    with pytest.raises(ConfigError, match="holdout_fraction"):
        split_specs(0, fraction)


# ---------------------------------------------------------------------------------------------- render and dataset


def test_render_size_jitter_and_canonical_picture():
    spec = ShapeSpec("green", "square", "large", "center")
    picture = render(spec, 48)
    assert isinstance(picture, Image.Image) and picture.size == (48, 48) and picture.mode == "RGB"
    assert np.array_equal(np.asarray(render(spec, 48)), np.asarray(picture))  # no rng: no jitter
    jittered = [np.asarray(render(spec, 48, np.random.default_rng(seed))) for seed in range(2)]
    assert not np.array_equal(jittered[0], jittered[1])
    assert np.array_equal(jittered[0], np.asarray(render(spec, 48, np.random.default_rng(0))))
    assert tuple(np.asarray(picture)[0, 0]) == (0, 0, 0) and tuple(np.asarray(picture)[24, 24]) == COLOUR_RGB["green"]
    with pytest.raises(ConfigError, match="image_size"):
        render(spec, 4)


def test_dataset_items_are_deterministic_in_range_and_captioned():
    specs = all_specs()[:10]
    dataset = ShapesDataset(specs, samples_per_spec=3, image_size=32, seed=7)
    assert len(dataset) == 30
    image, caption = dataset[4]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0 and float(image.max()) > 0.5
    assert caption == specs[1].caption == dataset.spec(4).caption
    assert dataset.images.dtype == torch.uint8 and dataset.images.shape == (30, 3, 32, 32)

    same = ShapesDataset(specs, samples_per_spec=3, image_size=32, seed=7)
    other = ShapesDataset(specs, samples_per_spec=3, image_size=32, seed=8)
    assert torch.equal(same.images, dataset.images) and same.captions == dataset.captions
    assert not torch.equal(other.images, dataset.images) and other.captions == dataset.captions
    # An item depends on (seed, index), not on the rest of the dataset.
    longer = ShapesDataset([*specs, *all_specs()[10:12]], samples_per_spec=3, image_size=32, seed=7)
    assert torch.equal(longer.images[:30], dataset.images)
    # Samples of one spec differ (jitter), and collate into batches.
    assert not torch.equal(dataset[0][0], dataset[1][0])
    images, captions = next(iter(torch.utils.data.DataLoader(dataset, batch_size=8)))
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8


def test_dataset_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        ShapesDataset([], samples_per_spec=1)
    with pytest.raises(ConfigError):
        ShapesDataset(all_specs()[:1], samples_per_spec=0)


# ------------------------------------------------------------------------------------------------------------ checker


@pytest.mark.parametrize("image_size", [32, 64])
def test_checker_reads_clean_images(image_size):
    dataset = ShapesDataset(all_specs(), samples_per_spec=2, image_size=image_size, seed=1)
    result = score(dataset.images.float() / 255, [dataset.spec(i) for i in range(len(dataset))])
    # Measured: 1.0 for every attribute at both sizes (360 jittered images each).
    assert all(result[name] >= 0.99 for name in (*ATTRIBUTES, "all")), result


@pytest.mark.parametrize(
    ("image_size", "radius", "noise", "min_shape"),
    [
        (32, 1.0, 0.05, 0.95),  # measured: 1.0 everywhere (0.996 shape with other seeds)
        (64, 1.0, 0.05, 0.95),  # measured: 1.0 everywhere
        (32, 1.5, 0.05, 0.85),  # measured: shape 0.939 (8-pixel small shapes, heavily blurred), the rest 1.0
    ],
)
def test_checker_is_robust_to_blur_and_noise(image_size, radius, noise, min_shape):
    specs = all_specs() * 2
    result = score(_degraded(specs, image_size, radius, noise, seed=image_size), specs)
    assert result["colour"] >= 0.98 and result["position"] >= 0.98 and result["size"] >= 0.98, result
    assert result["shape"] >= min_shape, result


def test_checker_is_near_chance_on_noise_images():
    specs = all_specs() * 2
    generator = torch.Generator().manual_seed(0)
    result = score(torch.rand(len(specs), 3, 32, 32, generator=generator), specs)
    chance = chance_levels()
    # Measured: colour 0.189, shape 0.333, size 0.5, position 0.2, all 0.003 for this seed.
    assert all(result[name] < chance[name] + 0.1 for name in ATTRIBUTES), result
    assert result["all"] < 0.03, result


def test_checker_is_near_chance_on_mismatched_specs():
    specs = all_specs() * 2
    images = _degraded(specs, 32, radius=0.5, noise=0.0, seed=5)
    assert score(images, specs)["all"] >= 0.99
    order = np.random.default_rng(0).permutation(len(specs))
    mismatched = list(specs)
    for previous, current in zip(np.roll(order, 1), order, strict=True):  # a random cycle: almost always another spec
        mismatched[current] = specs[previous]
    assert sum(a == b for a, b in zip(specs, mismatched, strict=True)) <= 3
    result = score(images, mismatched)
    # Measured: colour 0.172, shape 0.311, size 0.511, position 0.186, all 0.003 (the one pair that matched).
    chance = chance_levels()
    assert all(result[name] < chance[name] + 0.1 for name in ATTRIBUTES), result
    assert result["all"] < 0.03, result


def test_checker_reads_nothing_from_a_blank_image():
    blank = torch.full((3, 32, 32), 0.3)
    assert check_image(blank) == ShapeReading(None, None, None, None)
    spec = ShapeSpec("red", "circle", "large", "top left")
    assert score(blank[None], [spec]) == dict.fromkeys((*ATTRIBUTES, "all"), 0.0)


def test_checker_works_on_another_background_and_numpy():
    spec = ShapeSpec("yellow", "triangle", "large", "bottom right")
    image = from_pil(render(spec, 32, np.random.default_rng(0)))
    grey = 0.2 + 0.8 * image  # a lighter background: the checker estimates it instead of assuming black
    reading = check_image(grey.numpy())
    assert reading == ShapeReading("yellow", "triangle", "large", "bottom right")
    assert check_image((image * 255).round().to(torch.uint8)) == reading


def test_checker_and_score_validate_inputs():
    with pytest.raises(ShapeError, match="float\\[3, H, W\\]"):
        check_image(torch.rand(1, 32, 32))
    with pytest.raises(ShapeError, match="one spec per image"):
        score(torch.rand(2, 3, 32, 32), all_specs()[:1])
    with pytest.raises(ShapeError):
        score(torch.rand(0, 3, 32, 32), [])


def test_every_reading_combination_is_reachable_on_canonical_pictures():
    readings = {check_image(from_pil(render(spec, 32))) for spec in all_specs()}
    expected = {ShapeReading(*combo) for combo in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)}
    assert readings == expected
