"""WebDataset-style tar shards, read with the standard library (no extra needed).

A shard is a tar file whose members are grouped into samples by key: ``dir/0001.jpg`` and ``dir/0001.txt`` are one
sample (the key is the path up to the first dot of the file name, as in WebDataset). The image is the first member
with an image extension; the caption comes from ``.txt`` (one per line, one drawn at random) or from ``.json``
(``{"caption": ...}`` or ``{"captions": [...]}``).

Shard specs: local paths, globs, brace patterns (``data/shard-{0000..0099}.tar``, ``{train,extra}.tar``), ``http://``
or ``https://`` URLs (streamed), and ``pipe:COMMAND`` (its standard output is read); several specs are joined with
``::``. Every epoch the shard order is shuffled (seeded by ``(seed, epoch)``), the shards are split over processes
(``shards[rank::world_size]``) and then over DataLoader workers, and samples pass through a seeded shuffle buffer. A
corrupt sample or a truncated shard is skipped and reported; the run goes on.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import re
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image

from dalle_core.errors import DataError
from dalle_core.images import from_pil
from dalle_train.datasets.folder import caption_lines, choose_caption
from dalle_train.datasets.samples import Item, ItemTransform, Sample, describe_failure

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b (zero-padded like the first bound) and ``{x,y}`` -> x y; the leftmost group
    varies slowest, as in a shell."""
    matches = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m is not None]
    if not matches:
        return [pattern]
    match = min(matches, key=lambda m: m.start())
    head, tail = pattern[: match.start()], pattern[match.end() :]
    if match.re is _RANGE:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(number).zfill(width) for number in range(int(first), int(last) + step, step)]
    else:
        choices = match.group(1).split(",")
    return [name for choice in choices for name in expand_braces(head + choice + tail)]


def is_remote(spec: str) -> bool:
    return spec.startswith(("http://", "https://", "pipe:"))


def expand_shards(spec: str) -> list[str]:
    """The shard list of a spec (see the module doc); local files must exist."""
    shards: list[str] = []
    for part in (piece.strip() for piece in spec.split("::")):
        if not part:
            continue
        for name in expand_braces(part):
            if is_remote(name):
                shards.append(name)
            elif glob.has_magic(name):
                matches = sorted(glob.glob(name))
                if not matches:
                    raise DataError(f"shard pattern {name!r} matches no file")
                shards += matches
            else:
                if not Path(name).is_file():
                    raise DataError(f"shard not found: {name}")
                shards.append(name)
    if not shards:
        raise DataError(f"shard spec {spec!r} names no shard")
    return shards


@contextlib.contextmanager
def open_shard(spec: str) -> Iterator[IO[bytes]]:
    if spec.startswith("pipe:"):
        process = subprocess.Popen(spec[len("pipe:") :], shell=True, stdout=subprocess.PIPE)
        try:
            yield process.stdout  # type: ignore[misc]
        finally:
            process.kill()
            process.wait()
    elif spec.startswith(("http://", "https://")):
        with urllib.request.urlopen(spec, timeout=60) as response:
            yield response
    else:
        with open(spec, "rb") as handle:
            yield handle


def sample_key(member_name: str) -> tuple[str, str]:
    """``dir/0001.seg.jpg`` -> (``dir/0001``, ``seg.jpg``)."""
    directory, _, base = member_name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_tar_groups(stream: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each run of consecutive members with the same key."""
    key: str | None = None
    group: dict[str, bytes] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for member in archive:
            if not member.isfile():
                continue
            name_key, extension = sample_key(member.name)
            if key is not None and name_key != key:
                yield key, group
                group = {}
            key = name_key
            handle = archive.extractfile(member)
            group[extension] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, group


def decode_group(
    group: dict[str, bytes], image_size: int, rng: np.random.Generator, min_crop_area: float = 1.0
) -> Item:
    image_bytes = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
    if image_bytes is None:
        raise DataError(f"no image member (expected one of {', '.join(IMAGE_EXTENSIONS)}), got {sorted(group)}")
    if "txt" in group:
        captions = caption_lines(group["txt"].decode("utf-8"))
    elif "json" in group:
        meta = json.loads(group["json"].decode("utf-8"))
        captions = meta.get("captions") or ([meta["caption"]] if "caption" in meta else [])
    else:
        raise DataError(f"no caption member (.txt or .json), got {sorted(group)}")
    caption = choose_caption(captions, rng)
    with Image.open(io.BytesIO(image_bytes)) as picture:
        image = from_pil(picture, image_size, min_crop_area=min_crop_area, rng=rng)
    return {"image": image, "caption": caption}


class TarShardStream(torch.utils.data.IterableDataset):
    """The samples of one process's share of the shards for the current ``epoch`` (set it before iterating)."""

    def __init__(
        self,
        shards: list[str],
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        transform: ItemTransform | None = None,
        min_crop_area: float = 1.0,
    ) -> None:
        if len(shards) < world_size:
            raise DataError(
                f"{len(shards)} shards cannot be split over {world_size} processes; make at least one shard each"
            )
        self.shards = list(shards)
        self.image_size = image_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.transform = transform
        self.min_crop_area = min_crop_area
        self.epoch = 0

    def shards_for(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """This process's and this worker's shards for the current epoch."""
        order = list(self.shards)
        if self.shuffle:
            order = [order[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(order))]
        return order[self.rank :: self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng((self.seed, self.epoch, self.rank, worker))
        buffer: list[Sample] = []
        pending: list[str] = []
        for sample in self._samples(self.shards_for(worker, num_workers), rng, pending):
            if not self.shuffle:
                yield sample
                continue
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def _samples(self, shards: list[str], rng: np.random.Generator, pending: list[str]) -> Iterator[Sample]:
        for shard in shards:
            try:
                with open_shard(shard) as stream:
                    for key, group in iter_tar_groups(stream):
                        try:
                            item = decode_group(group, self.image_size, rng, self.min_crop_area)
                            if self.transform is not None:
                                item = self.transform(item)
                        except Exception as error:
                            pending.append(describe_failure(f"{shard}:{key}", error))
                            continue
                        yield Sample(item, pending[:])
                        pending.clear()
            except Exception as error:
                pending.append(describe_failure(f"{shard} (rest of shard)", error))


def write_tar_shard(path: str | Path, samples: list[tuple[str, bytes, str, str]]) -> None:
    """Write ``(key, image_bytes, image_extension, caption_text)`` samples as one shard (for tests and tools)."""
    with tarfile.open(path, "w") as archive:
        for key, image_bytes, extension, caption in samples:
            for data, suffix in ((image_bytes, extension), (caption.encode("utf-8"), "txt")):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
