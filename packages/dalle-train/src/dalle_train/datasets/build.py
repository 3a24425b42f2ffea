"""Turn a :class:`~dalle_train.run_config.DataConfig` into training and validation sources and batch streams."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dalle_core.errors import DataError
from dalle_core.protocols import TextTokenizer
from dalle_train.backends.base import Backend
from dalle_train.datasets.samples import Item, ItemTransform, SkipUnreadable
from dalle_train.datasets.streams import BatchStream, MapBatchStream, StreamBatchStream, evaluation_batches
from dalle_train.datasets.tar_shards import TarShardStream, expand_shards
from dalle_train.run_config import DataConfig

Batch = dict[str, Any]


class IndexedView:
    """Some items of a map-style dataset (a train/validation split), keeping per-epoch reads and descriptions."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, index: int, epoch: int) -> Any:
        reader = getattr(self.dataset, "read", None)
        inner = self.indices[index]
        return reader(inner, epoch) if reader is not None else self.dataset[inner]

    def __getitem__(self, index: int) -> Any:
        return self.read(index, 0)

    def describe(self, index: int) -> str:
        describe = getattr(self.dataset, "describe", None)
        return describe(self.indices[index]) if describe is not None else f"item {self.indices[index]}"


@dataclass
class DataSources:
    """Map-style datasets or shard lists, for training and (optionally) validation."""

    kind: str
    train: Any
    validation: Any
    streamed: bool
    has_images: bool


def split_fraction(dataset: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    if fraction <= 0:
        return dataset, None
    order = np.random.default_rng((seed, 1)).permutation(len(dataset))
    held = max(1, round(fraction * len(dataset)))
    if held >= len(dataset):
        raise DataError(f"data.validation_fraction={fraction} leaves no training sample of {len(dataset)}")
    return IndexedView(dataset, sorted(order[held:].tolist())), IndexedView(dataset, sorted(order[:held].tolist()))


def open_sources(config: DataConfig, image_size: int) -> DataSources:
    """Open (scan, list, index) the configured data; nothing is decoded yet."""
    kind = config.kind
    train: Any
    validation: Any
    if kind == "shapes":
        from dalle_train.datasets.shapes import ShapesDataset, split_specs

        shapes = config.shapes
        train_specs, held = split_specs(config.seed, shapes.holdout_fraction)
        train = ShapesDataset(train_specs, shapes.samples_per_spec, image_size, seed=config.seed)
        validation = (
            ShapesDataset(held, shapes.validation_samples_per_spec, image_size, config.seed + 1) if held else None
        )
        return DataSources(kind, train, validation, streamed=False, has_images=True)
    if kind == "openmoji":
        from dalle_train.datasets.openmoji import openmoji_split

        train, validation = openmoji_split(
            image_size, config.openmoji.validation_fraction, config.seed, config.openmoji.limit
        )
        return DataSources(kind, train, validation, streamed=False, has_images=True)
    if config.path is None:
        raise DataError(f"data.kind={kind} needs data.path")
    if kind == "folder":
        from dalle_train.datasets.folder import ImageTextFolder

        train = ImageTextFolder(config.path, image_size, config.seed, config.random_crop_min_area)
        if config.validation_path is not None:
            return DataSources(
                kind, train, ImageTextFolder(config.validation_path, image_size, config.seed), False, True
            )
        train_part, validation = split_fraction(train, config.validation_fraction, config.seed)
        if validation is not None:
            validation = IndexedView(train.centre_cropped(), validation.indices)
        return DataSources(kind, train_part, validation, streamed=False, has_images=True)
    if kind == "token_shards":
        from dalle_train.datasets.token_shards import TokenShards

        train = TokenShards(config.path)
        if config.validation_path is not None:
            return DataSources(kind, train, TokenShards(config.validation_path), False, False)
        train, validation = split_fraction(train, config.validation_fraction, config.seed)
        return DataSources(kind, train, validation, streamed=False, has_images=False)
    if kind == "webdataset":
        validation = expand_shards(config.validation_path) if config.validation_path else None
        return DataSources(kind, expand_shards(config.path), validation, streamed=True, has_images=True)
    raise DataError(f"data.kind: unknown kind {kind!r}")  # pragma: no cover - the config's Literal prevents it


class CaptionEncoder:
    """Adds ``text_ids`` to an item (in DataLoader workers); a caption too long without truncation is unreadable."""

    def __init__(self, tokenizer: TextTokenizer, text_seq_len: int, truncate: bool) -> None:
        self.tokenizer, self.text_seq_len, self.truncate = tokenizer, text_seq_len, truncate

    def __call__(self, item: Item) -> Item:
        ids = self.tokenizer.encode([item["caption"]], self.text_seq_len, truncate=self.truncate)[0]
        return {**item, "text_ids": ids}


def train_stream(
    sources: DataSources,
    config: DataConfig,
    image_size: int,
    micro_batch: int,
    backend: Backend,
    seed: int,
    transform: ItemTransform | None,
) -> BatchStream:
    if sources.streamed:
        dataset = TarShardStream(
            sources.train,
            image_size,
            backend.rank,
            backend.world_size,
            seed,
            True,
            config.shuffle_buffer,
            transform,
            config.random_crop_min_area,
        )
        return StreamBatchStream(dataset, micro_batch, config.num_workers)
    wrapped = SkipUnreadable(sources.train, transform)
    return MapBatchStream(wrapped, micro_batch, backend.rank, backend.world_size, seed, config.num_workers)


def validation_batches(
    sources: DataSources,
    image_size: int,
    micro_batch: int,
    backend: Backend,
    max_batches: int,
    transform: ItemTransform | None,
) -> Callable[[], Iterator[Batch]] | None:
    if sources.validation is None:
        return None
    if sources.streamed:
        dataset: Any = TarShardStream(
            sources.validation, image_size, backend.rank, backend.world_size, shuffle=False, transform=transform
        )
    else:
        dataset = SkipUnreadable(sources.validation, transform)

    def batches() -> Iterator[Batch]:
        return evaluation_batches(dataset, micro_batch, backend.rank, backend.world_size, max_batches)

    return batches


def first_items(sources: DataSources, image_size: int, count: int) -> list[Item]:
    """The first readable items (validation data preferred, always centre-cropped), for sample grids and prompts."""
    from dalle_train.datasets.folder import ImageTextFolder

    source = sources.validation if sources.validation is not None else sources.train
    if isinstance(source, ImageTextFolder):
        source = source.centre_cropped()
    if sources.streamed:
        stream = TarShardStream(source, image_size, shuffle=False)
        items = []
        for sample in stream:
            items.append(sample.item)
            if len(items) >= count:
                break
        return items
    wrapped = SkipUnreadable(source)
    positions = torch.linspace(0, len(wrapped) - 1, min(count, len(wrapped))).long().tolist()
    return [wrapped[index].item for index in positions]
