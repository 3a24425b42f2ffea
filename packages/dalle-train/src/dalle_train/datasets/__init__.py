"""Datasets for training dalle models."""

from dalle_train.datasets.shapes import (
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

__all__ = [
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
