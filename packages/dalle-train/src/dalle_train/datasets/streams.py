"""Per-process batch streams that can say where they are and start again from there (exact resume).

Map-style data: one endless sequence of samples, the concatenation of per-epoch permutations (epoch ``e`` is
``default_rng((seed, e)).permutation(N)``). Global micro-batch ``g`` is positions ``[g*G, (g+1)*G)`` of it, where
``G = micro_batch * world_size``, and process ``r`` takes the ``r``-th slice of ``micro_batch``. The position is one
number, the count of samples consumed by all processes together, so a run resumes exactly even on another number of
processes (as long as the global batch stays the same), and two processes see the same samples as one.

Streamed data (tar shards): each process reads its own shards; the position is ``(epoch, batches consumed in the
epoch)``, per process. Resuming replays the epoch and drops the consumed batches (the data is read again; nothing is
trained twice). On a different number of processes the stream restarts at the next epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from dalle_core.errors import DataError
from dalle_train.datasets.samples import SkipUnreadable, collate
from dalle_train.datasets.tar_shards import TarShardStream
from dalle_train.progress import console

Batch = dict[str, Any]


class RankBatches(torch.utils.data.Sampler):
    """Endless ``(index, epoch)`` keys of this process's micro-batches, from sample position ``start``."""

    def __init__(self, size: int, micro_batch: int, rank: int, world_size: int, seed: int, start: int = 0) -> None:
        self.size, self.micro_batch, self.rank, self.world_size = size, micro_batch, rank, world_size
        self.seed, self.start = seed, start
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.size)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng((self.seed, epoch)).permutation(self.size)
        return int(self._order[offset]), epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        while True:
            first = position + self.rank * self.micro_batch
            yield [self.key(first + i) for i in range(self.micro_batch)]
            position += self.micro_batch * self.world_size


class MapBatchStream:
    def __init__(
        self,
        dataset: SkipUnreadable,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
    ) -> None:
        self.dataset, self.micro_batch, self.rank, self.world_size = dataset, micro_batch, rank, world_size
        self.seed, self.num_workers = seed, num_workers
        self.position = 0
        self._iterator: Iterator[Batch] | None = None

    def _start(self) -> Iterator[Batch]:
        sampler = RankBatches(len(self.dataset), self.micro_batch, self.rank, self.world_size, self.seed, self.position)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate
        )
        return iter(loader)

    def __iter__(self) -> MapBatchStream:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.position += self.micro_batch * self.world_size
        return batch

    @property
    def epoch(self) -> int:
        return self.position // len(self.dataset)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "map", "position": self.position}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """Restore from the states of every process of the saved run (all equal for map-style data)."""
        state = states[0]
        if state.get("kind") != "map":
            console.print(
                f"[yellow]data position of kind {state.get('kind')!r} does not fit map-style data; restarting it"
            )
            return
        self.position = int(state["position"])
        self._iterator = None


class StreamBatchStream:
    def __init__(self, dataset: TarShardStream, micro_batch: int, num_workers: int = 0) -> None:
        self.dataset, self.micro_batch, self.num_workers = dataset, micro_batch, num_workers
        self.epoch, self.batches = 0, 0
        self._skip = 0
        self._iterator: Iterator[Batch] | None = None

    def _start(self) -> Iterator[Batch]:
        self.dataset.epoch = self.epoch
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.micro_batch, num_workers=self.num_workers, collate_fn=collate, drop_last=True
        )
        iterator = iter(loader)
        for _ in range(self._skip):  # replay to the saved position
            if next(iterator, None) is None:
                break
        self._skip = 0
        return iterator

    def __iter__(self) -> StreamBatchStream:
        return self

    def __next__(self) -> Batch:
        for _ in range(2):  # the current epoch, then at most one fresh epoch
            if self._iterator is None:
                self._iterator = self._start()
            batch = next(self._iterator, None)
            if batch is not None:
                self.batches += 1
                return batch
            if self.batches == 0:
                break
            self.epoch, self.batches, self._iterator = self.epoch + 1, 0, None
        raise DataError(
            f"process {self.dataset.rank} got no full batch of {self.micro_batch} from its shards "
            f"{self.dataset.shards_for()} in epoch {self.epoch}; use more or larger shards or a smaller batch"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stream", "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.dataset.world_size or any(s.get("kind") != "stream" for s in states):
            epoch = max((int(s.get("epoch", 0)) for s in states), default=0) + 1
            console.print(
                f"[yellow]the saved data position is for {len(states)} processes, this run has "
                f"{self.dataset.world_size}: starting streamed data at epoch {epoch}"
            )
            self.epoch, self.batches, self._skip = epoch, 0, 0
        else:
            state = states[self.dataset.rank]
            self.epoch, self.batches, self._skip = int(state["epoch"]), int(state["batches"]), int(state["batches"])
        self._iterator = None


BatchStream = MapBatchStream | StreamBatchStream


def evaluation_batches(
    dataset: SkipUnreadable | TarShardStream, micro_batch: int, rank: int, world_size: int, max_batches: int
) -> Iterator[Batch]:
    """A fixed, unshuffled pass over this process's share of validation data (at most ``max_batches`` batches)."""
    if isinstance(dataset, TarShardStream):
        loader: Any = torch.utils.data.DataLoader(dataset, batch_size=micro_batch, collate_fn=collate)
    else:
        indices = list(range(rank, len(dataset), world_size))
        batches = [indices[i : i + micro_batch] for i in range(0, len(indices), micro_batch)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate)
    for number, batch in enumerate(loader):
        if number >= max_batches:
            break
        yield batch
