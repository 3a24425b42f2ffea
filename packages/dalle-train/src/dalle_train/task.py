"""What a model contributes to the shared training loop: a :class:`TrainTask` (build, loss, export, samples) and
the :class:`StepContext` its loss may depend on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

Batch = dict[str, Any]


@dataclass(frozen=True)
class StepContext:
    """What a task's loss may depend on besides the batch."""

    step: int
    micro_step: int
    total_steps: int
    seed: int
    rank: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager[Any]]
    training: bool = True

    def generator_seed(self) -> int:
        """A seed unique to (seed, step, micro-step, process): reproducible noise that needs no saved state."""
        return (self.seed * 1_000_003 + self.step * 1_009 + self.micro_step * 101 + self.rank * 7 + 1) % (2**63)


class TrainTask(Protocol):
    """One model's part of training: how to build it, what its loss is, and what it writes and draws."""

    name: str

    def build_model(self) -> nn.Module: ...

    def loss(
        self, model: nn.Module, batch: Batch, context: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimise and detached scalar metrics (``loss`` among them), averaged over the batch."""
        ...

    def tokens(self, batch: Batch) -> int:
        """How many tokens (or pixels) the batch holds, for the throughput figure."""
        ...

    def scalars(self, step: int, total_steps: int) -> dict[str, float]:
        """Extra values to log at ``step`` (e.g. the Gumbel temperature)."""
        ...

    def signature(self) -> dict[str, Any]:
        """What must match for a checkpoint to resume (the architecture)."""
        ...

    def write_export(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        """Write the usable model (``model/`` of a checkpoint) from a full state dict."""
        ...

    def read_export(self, directory: Path) -> nn.Module:
        """Load what :meth:`write_export` wrote, as a plain model on CPU in eval mode."""
        ...

    def sample(self, model: nn.Module, path: Path, device: torch.device) -> dict[str, float]:
        """Draw samples with a plain (unsharded) model in eval mode, save them at ``path``, return metrics."""
        ...
