"""Training samples, the wrapper that skips unreadable ones, and the collate function that batches them.

Every data source yields :class:`Sample` objects: an item dict (``image`` float[C, H, W] in [0, 1] and ``caption``,
or ``text_ids``/``image_ids`` for pre-tokenized data), plus the reasons for any unreadable samples skipped on the way
to it. A corrupt file never stops a run: it is skipped, counted and reported through the batch's ``skipped`` list, a
plain value that crosses DataLoader worker processes. Only a long run of failures in a row raises, because that
means the data (not one file) is broken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dalle_core.errors import DataError

Item = dict[str, Any]
ItemTransform = Callable[[Item], Item]

MAX_UNREADABLE_IN_A_ROW = 64


@dataclass
class Sample:
    item: Item
    skipped: list[str] = field(default_factory=list)


def as_item(raw: Any) -> Item:
    """Accept what datasets commonly return: a dict, or an ``(image, caption)`` pair (the shapes dataset)."""
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, (tuple, list)) and len(raw) == 2:
        image, caption = raw
        return {"image": image, "caption": caption}
    raise DataError(f"expected a dataset item as a dict or an (image, caption) pair, got {type(raw).__name__}")


def read_item(dataset: Any, index: int, epoch: int) -> Item:
    """Item ``index`` of a map-style dataset; one with ``read(index, epoch)`` may vary it by epoch (caption choice)."""
    reader = getattr(dataset, "read", None)
    return as_item(reader(index, epoch) if reader is not None else dataset[index])


def describe_failure(where: str, error: BaseException) -> str:
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"{where}: {type(error).__name__}: {first_line}"


class SkipUnreadable(torch.utils.data.Dataset):
    """A map-style dataset whose unreadable items are replaced by the next readable one (and reported).

    Keys are ``(index, epoch)`` pairs (or plain indices). Replacing rather than dropping keeps every batch, and so
    every process's share of a distributed batch, the same size.
    """

    def __init__(self, dataset: Any, transform: ItemTransform | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.length = len(dataset)
        if self.length == 0:
            raise DataError("the dataset is empty")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        index, epoch = (key, 0) if isinstance(key, int) else key
        skipped: list[str] = []
        for attempt in range(min(self.length, MAX_UNREADABLE_IN_A_ROW)):
            current = (index + attempt) % self.length
            try:
                item = read_item(self.dataset, current, epoch)
                if self.transform is not None:
                    item = self.transform(item)
                return Sample(item, skipped)
            except Exception as error:
                name = getattr(self.dataset, "describe", lambda i: f"item {i}")(current)
                skipped.append(describe_failure(name, error))
        raise DataError(
            f"{len(skipped)} unreadable samples in a row from index {index}; the data looks broken, first: {skipped[0]}"
        )


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack tensors, list strings, and gather the skip reasons of the samples into ``batch['skipped']``."""
    items = [sample.item for sample in samples]
    batch: dict[str, Any] = {"skipped": [reason for sample in samples for reason in sample.skipped]}
    if not items:
        return batch
    for key in items[0]:
        values = [item[key] for item in items]
        if isinstance(values[0], torch.Tensor):
            batch[key + "s" if key in ("image", "caption") else key] = torch.stack(values)
        else:
            batch[key + "s" if key in ("image", "caption") else key] = list(values)
    return batch


def batch_size_of(batch: dict[str, Any]) -> int:
    for key in ("images", "text_ids", "image_ids"):
        if key in batch:
            return int(batch[key].shape[0])
    return len(batch.get("captions", []))
