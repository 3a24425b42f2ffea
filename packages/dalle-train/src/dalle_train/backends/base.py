"""The ``Backend`` protocol: everything the training loop needs to know about processes, devices and sharding.

The loop is written once against this protocol; a backend decides how a model is placed and wrapped, how gradients
are synchronised, and how training state is gathered and written. Model code never reads distributed state.

Adding a backend (DeepSpeed, Horovod) means implementing these members: ``prepare`` may return any module whose
``__call__`` runs the forward pass (a DeepSpeed engine is one) and any optimizer-like object that ``step`` knows how
to drive; ``save``/``load`` write and read the backend's own format under the directory they are given, and
``full_state_dict`` consolidates the weights for export, whatever the sharding. A backend that builds its engine
from the loop's settings (DeepSpeed: micro-batch, accumulation, clipping, precision) also implements
:class:`LoopAwareBackend`; the loop calls its ``configure_loop`` before ``prepare``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from dalle_train.config import LoopConfig, OptimizerConfig

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did: the global gradient norm before clipping, and whether it was applied."""

    grad_norm: float
    applied: bool


@dataclass(frozen=True)
class LoopSettings:
    """What a backend that owns the optimizer step must know about one stage's loop before ``prepare``.

    ``stage`` names the config section in error messages (``dalle`` for ``dalle.loop.batch_size``); ``batch_size`` is
    the global batch of one optimizer step and ``micro_batch_size`` what one process feeds per micro-batch.
    """

    stage: str
    batch_size: int
    micro_batch_size: int
    grad_accum_steps: int
    precision: str
    max_grad_norm: float
    ema: bool

    @classmethod
    def of(cls, stage: str, loop: LoopConfig, optimizer: OptimizerConfig, world_size: int) -> LoopSettings:
        micro = max(1, loop.batch_size // (world_size * loop.grad_accum_steps))  # divisibility is checked elsewhere
        return cls(
            stage,
            loop.batch_size,
            micro,
            loop.grad_accum_steps,
            loop.precision,
            optimizer.grad_clip,
            loop.ema_decay > 0,
        )


@runtime_checkable
class Backend(Protocol):
    """How a training process runs: alone, or as one rank of several."""

    name: str

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def is_main(self) -> bool: ...

    def prepare(self, model: nn.Module, build_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap ``model``, then build its optimizer with ``build_optimizer(module)``.

        It takes a factory rather than an optimizer because sharding (FSDP) replaces the parameters, and an optimizer
        built before that would hold the old ones.
        """
        ...

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module with the original parameter names (no ``module.`` prefix of a wrapper)."""
        ...

    def no_sync(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Within it, backward passes accumulate gradients locally without synchronising them."""
        ...

    def backward(self, loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None: ...

    def step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        max_grad_norm: float,
    ) -> StepResult:
        """Clip (if ``max_grad_norm`` > 0), step unless the gradients are not finite, and zero the gradients."""
        ...

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over processes (a new tensor; the input is left as it is)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_gather_object(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order."""
        ...

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process."""
        ...

    def barrier(self) -> None: ...

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU on the main process (empty elsewhere). Collective."""
        ...

    def save(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Write the resumable model and optimizer state under ``directory`` (shared by all ranks). Collective."""
        ...

    def load(self, directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Restore what :meth:`save` wrote (possibly by another backend of a compatible format). Collective."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LoopAwareBackend(Protocol):
    """A backend that builds its engine from the loop's settings (DeepSpeed)."""

    def configure_loop(self, settings: LoopSettings) -> None:
        """Check ``settings`` against the backend's own configuration (raising ``ConfigError``) and keep them for the
        next ``prepare``. Called once per stage before ``prepare``, and by the run's checks before any work."""
        ...
