"""Pre-tokenized shards: text ids, image ids and captions, computed once so training never runs the VAE encoder.

Format (``dalle-token-shards/1``), a directory::

    DIR/index.json                  format, vocabularies, sequence lengths, shard list and counts (below)
    DIR/shard-00000/text_ids.npy    int32 [n, text_seq_len]   padded with text_pad_id
    DIR/shard-00000/image_ids.npy   int32 [n, image_seq_len]  row-major over the image tokenizer's grid
    DIR/shard-00000/captions.npy    unicode [n]               the captions the text ids encode
    DIR/text_tokenizer/             the text tokenizer, saved (spec.json names its kind)

``index.json``: ``{"format", "count", "text_seq_len", "image_seq_len", "num_text_tokens", "text_pad_id",
"num_image_tokens", "image_fmap_size", "image_tokenizer": {"kind", "source"}, "shards": [{"name", "count"}]}``.
Plain ``.npy`` files are memory-mapped, so a large set is not read into memory, and need no pickle to load.
Shards are written atomically and ``index.json`` last, so a half-written directory is never mistaken for a whole one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_core.checkpoint import atomic_directory, read_json, write_json
from dalle_core.errors import DataError, ShapeError
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_train.datasets.samples import Item

FORMAT = "dalle-token-shards/1"
INDEX_FILE = "index.json"
TEXT_TOKENIZER_DIR = "text_tokenizer"


def write_token_shards(
    directory: str | Path,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, Sequence[str]]],
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    shard_size: int = 10_000,
    image_tokenizer_source: str | None = None,
) -> dict[str, Any]:
    """Write ``(text_ids int[B, T], image_ids int[B, N], captions)`` batches as token shards; returns the index.

    ``directory`` is replaced if it exists. ``image_tokenizer_source`` (e.g. the VAE checkpoint path) is recorded so
    a reader knows which tokenizer made the image ids.
    """
    directory = Path(directory)
    if shard_size < 1:
        raise DataError(f"shard_size must be >= 1, got {shard_size}")
    with atomic_directory(directory) as staging:
        text_tokenizer.save(staging / TEXT_TOKENIZER_DIR)
        shards: list[dict[str, Any]] = []
        pending: list[tuple[np.ndarray, np.ndarray, list[str]]] = []
        pending_count = 0
        text_seq_len = image_seq_len = None

        def flush(limit: int) -> None:
            nonlocal pending, pending_count
            texts = np.concatenate([p[0] for p in pending])
            images = np.concatenate([p[1] for p in pending])
            captions = [c for p in pending for c in p[2]]
            name = f"shard-{len(shards):05d}"
            shard_dir = staging / name
            shard_dir.mkdir()
            np.save(shard_dir / "text_ids.npy", texts[:limit])
            np.save(shard_dir / "image_ids.npy", images[:limit])
            np.save(shard_dir / "captions.npy", np.array(captions[:limit], dtype=str))
            shards.append({"name": name, "count": int(limit)})
            rest = (texts[limit:], images[limit:], captions[limit:])
            pending = [rest] if len(rest[2]) else []
            pending_count = len(rest[2])

        for text_ids, image_ids, captions in batches:
            text = _as_int32(text_ids, "text_ids", text_tokenizer.vocab_size)
            image = _as_int32(image_ids, "image_ids", image_tokenizer.num_tokens)
            if not (text.shape[0] == image.shape[0] == len(captions)):
                raise ShapeError(
                    f"expected as many text rows, image rows and captions, got {text.shape[0]}, {image.shape[0]} "
                    f"and {len(captions)}"
                )
            if image.shape[1] != image_tokenizer.fmap_size**2:
                raise ShapeError(
                    f"image_ids rows have {image.shape[1]} ids but the image tokenizer makes "
                    f"{image_tokenizer.fmap_size**2}"
                )
            if text_seq_len is None:
                text_seq_len, image_seq_len = text.shape[1], image.shape[1]
            elif text.shape[1] != text_seq_len:
                raise ShapeError(f"text_ids rows changed length from {text_seq_len} to {text.shape[1]}")
            pending.append((text, image, list(captions)))
            pending_count += len(captions)
            while pending_count >= shard_size:
                flush(shard_size)
        if pending_count:
            flush(pending_count)
        if not shards:
            raise DataError("write_token_shards got no samples")
        index = {
            "format": FORMAT,
            "count": sum(shard["count"] for shard in shards),
            "text_seq_len": int(text_seq_len),  # type: ignore[arg-type]
            "image_seq_len": int(image_seq_len),  # type: ignore[arg-type]
            "num_text_tokens": text_tokenizer.vocab_size,
            "text_pad_id": text_tokenizer.pad_id,
            "num_image_tokens": image_tokenizer.num_tokens,
            "image_fmap_size": image_tokenizer.fmap_size,
            "image_tokenizer": {"kind": getattr(image_tokenizer, "kind", None), "source": image_tokenizer_source},
            "shards": shards,
        }
        write_json(staging / INDEX_FILE, index)
    return index


def _as_int32(ids: torch.Tensor | np.ndarray, name: str, vocabulary: int) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ShapeError(f"{name}: expected an integer array [batch, length], got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= vocabulary):
        raise ShapeError(f"{name}: ids must be in [0, {vocabulary}), got [{array.min()}, {array.max()}]")
    return array.astype(np.int32)


def read_token_index(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(f"{directory} is not a token-shard directory: expected {INDEX_FILE}")
    index = read_json(path)
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: expected format {FORMAT!r}, got {index.get('format')!r}")
    return index


class TokenShards:
    """Map-style dataset over a token-shard directory: items ``{"text_ids", "image_ids", "caption"}`` (int64)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.index = read_token_index(self.directory)
        self._starts = np.cumsum([0] + [shard["count"] for shard in self.index["shards"]])
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, number: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._pid != os.getpid():  # a DataLoader worker: open its own maps
            self._arrays, self._pid = {}, os.getpid()
        if number not in self._arrays:
            shard_dir = self.directory / self.index["shards"][number]["name"]
            self._arrays[number] = tuple(  # type: ignore[assignment,unused-ignore]
                np.load(shard_dir / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                for name in ("text_ids", "image_ids", "captions")
            )
        return self._arrays[number]

    def describe(self, index: int) -> str:
        return f"{self.directory} sample {index}"

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(index)
        number = int(np.searchsorted(self._starts, index, side="right") - 1)
        texts, images, captions = self._shard(number)
        row = index - int(self._starts[number])
        return {
            "text_ids": torch.from_numpy(np.array(texts[row], dtype=np.int64)),
            "image_ids": torch.from_numpy(np.array(images[row], dtype=np.int64)),
            "caption": str(captions[row]),
        }


@torch.no_grad()
def tokenize_to_shards(
    dataset: Any,
    directory: str | Path,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    text_seq_len: int,
    batch_size: int = 64,
    shard_size: int = 10_000,
    truncate: bool = True,
    image_tokenizer_source: str | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Encode every readable ``(image, caption)`` item of a map-style ``dataset`` into token shards.

    Unreadable items are skipped and counted in the index (``"skipped"``), as in training.
    """
    from dalle_train.datasets.samples import read_item
    from dalle_train.progress import make_progress

    count = len(dataset)
    if count == 0:
        raise DataError("cannot tokenize an empty dataset")
    skipped: list[str] = []

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        with make_progress() as progress:
            task = progress.add_task("encode images", total=count, status="")
            for start in range(0, count, batch_size):
                images, captions = [], []
                for index in range(start, min(count, start + batch_size)):
                    try:
                        item = read_item(dataset, index, 0)
                    except Exception as error:
                        skipped.append(f"item {index}: {type(error).__name__}: {error}")
                        continue
                    images.append(item["image"])
                    captions.append(item["caption"])
                progress.advance(task, min(count, start + batch_size) - start)
                if captions:
                    text_ids = text_tokenizer.encode(captions, text_seq_len, truncate=truncate)
                    image_ids = image_tokenizer.encode(torch.stack(images).to(device)).cpu()
                    yield text_ids, image_ids, captions

    index = write_token_shards(
        directory, batches(), text_tokenizer, image_tokenizer, shard_size, image_tokenizer_source
    )
    if skipped:  # recorded after the fact: the index is rewritten atomically (temporary file, then rename)
        index["skipped"] = len(skipped)
        temporary = Path(directory) / f".{INDEX_FILE}.tmp"
        write_json(temporary, index)
        os.replace(temporary, Path(directory) / INDEX_FILE)
    return index
