from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_core.errors import ShapeError
from dalle_core.images import from_pil, make_grid, save_image_grid, square_crop, to_pil


def test_grid_places_each_image():
    images = torch.stack([torch.full((3, 2, 2), value) for value in (0.0, 0.25, 0.5, 0.75, 1.0)])
    grid = make_grid(images, nrow=2, padding=1, pad_value=0.125)
    assert grid.shape == (3, 1 + 3 * 3, 1 + 2 * 3)
    assert float(grid[0, 1, 1]) == 0.0 and float(grid[0, 1, 4]) == 0.25
    assert float(grid[0, 4, 1]) == 0.5 and float(grid[0, 7, 1]) == 1.0
    assert float(grid[0, 7, 4]) == 0.125, "the empty sixth cell keeps the pad value"
    assert float(grid[0, 0, 0]) == 0.125


def test_pil_round_trip_and_png(tmp_path):
    image = torch.rand(3, 8, 8)
    back = from_pil(to_pil(image))
    assert torch.allclose(back, image, atol=1 / 255)
    path = save_image_grid(image[None].repeat(4, 1, 1, 1), tmp_path / "g.png", nrow=2, scale=3)
    with Image.open(path) as png:
        assert png.size == ((2 * 10 + 2) * 3, (2 * 10 + 2) * 3)


def test_from_pil_crops_and_resizes():
    picture = Image.new("RGB", (20, 10), (255, 0, 0))
    tensor = from_pil(picture, size=4)
    assert tensor.shape == (3, 4, 4)
    assert torch.allclose(tensor[0], torch.ones(4, 4)) and float(tensor[1:].abs().max()) == 0.0


def test_square_crop_centre_and_random_draws():
    assert square_crop(20, 10) == (5, 0, 10)
    assert square_crop(20, 10, 0.5, None) == (5, 0, 10), "no generator: always the centre"
    rng = np.random.default_rng(0)
    boxes = [square_crop(30, 20, 0.5, rng) for _ in range(2000)]
    for left, top, side in boxes:
        assert 0 <= left <= 30 - side and 0 <= top <= 20 - side
        assert 0.5 * 400 - 20 <= side * side <= 400  # area fraction in [0.5, 1] of the 20x20 square, up to rounding
    sides = np.array([side for _, _, side in boxes])
    # side = round(20 * sqrt(u)), u ~ U[0.5, 1]: P(side <= 16) = P(u < 16.5**2 / 400) = (0.680625 - 0.5) / 0.5
    assert abs(float((sides <= 16).mean()) - 0.36125) < 0.04
    lefts = np.array([left for left, _, side in boxes if side == 15])
    assert lefts.min() == 0 and lefts.max() == 15, "every position is reachable"
    assert square_crop(30, 20, 0.5, np.random.default_rng(7)) == square_crop(30, 20, 0.5, np.random.default_rng(7))


def test_from_pil_random_crop_reads_the_drawn_square():
    """A 2x2 grid of colours, 64 px each: the crop's colours are those of the quadrants its square overlaps."""
    colours = {(0, 0): (255, 0, 0), (1, 0): (0, 255, 0), (0, 1): (0, 0, 255), (1, 1): (255, 255, 255)}
    picture = Image.new("RGB", (128, 128))
    for (col, row), colour in colours.items():
        picture.paste(colour, (col * 64, row * 64, col * 64 + 64, row * 64 + 64))
    for seed in range(20):
        left, top, _ = square_crop(128, 128, 0.25, np.random.default_rng(seed))
        tensor = from_pil(picture, 8, min_crop_area=0.25, rng=np.random.default_rng(seed))
        corner = tuple(round(float(v) * 255) for v in tensor[:, 0, 0])
        expected = colours[(int(left >= 64), int(top >= 64))]
        assert all(abs(a - b) <= 8 for a, b in zip(corner, expected, strict=True)), (seed, corner, expected)
    centred = from_pil(picture, 8, min_crop_area=1.0, rng=np.random.default_rng(0))
    assert torch.equal(centred, from_pil(picture, 8))


def test_bad_shapes_raise():
    with pytest.raises(ShapeError, match=r"got shape \(2, 4, 4\)"):
        to_pil(torch.rand(2, 4, 4))
    with pytest.raises(ShapeError):
        make_grid(torch.rand(3, 4, 4))
