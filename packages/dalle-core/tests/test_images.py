from __future__ import annotations

import pytest
import torch
from PIL import Image

from dalle_core.errors import ShapeError
from dalle_core.images import from_pil, make_grid, save_image_grid, to_pil


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


def test_bad_shapes_raise():
    with pytest.raises(ShapeError, match=r"got shape \(2, 4, 4\)"):
        to_pil(torch.rand(2, 4, 4))
    with pytest.raises(ShapeError):
        make_grid(torch.rand(3, 4, 4))
