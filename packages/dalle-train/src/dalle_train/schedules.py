"""Learning-rate and temperature schedules.

Warmup, cosine and constant are pure functions of the step, so a resumed run recomputes them; the plateau schedule
depends on the losses seen so far and keeps its state in :class:`PlateauState`, which checkpoints save.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dalle_train.config import OptimizerConfig


def learning_rate(step: int, total_steps: int, config: OptimizerConfig, plateau_scale: float = 1.0) -> float:
    """The rate for 0-based ``step``: linear warmup over ``warmup_steps``, then the configured schedule.

    ``cosine`` decays from ``lr`` to ``lr * min_lr_ratio`` at the last step, ``constant`` stays at ``lr`` and
    ``plateau`` is ``lr * plateau_scale`` (the scale comes from :class:`PlateauState`).
    """
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "plateau":
        return config.lr * plateau_scale
    span = max(1, total_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class PlateauState:
    """Reduce-on-plateau bookkeeping: the best loss so far, evaluations without improvement, the current scale."""

    best: float = math.inf
    bad_evaluations: int = 0
    scale: float = 1.0

    def observe(self, loss: float, config: OptimizerConfig) -> bool:
        """Record an evaluated loss; returns True when this lowered the scale."""
        if math.isfinite(loss) and loss < self.best * (1 - config.plateau_threshold):
            self.best, self.bad_evaluations = loss, 0
            return False
        self.bad_evaluations += 1
        if self.bad_evaluations < config.plateau_patience:
            return False
        self.bad_evaluations = 0
        lowered = max(config.min_lr_ratio, self.scale * config.plateau_factor)
        changed = lowered < self.scale
        self.scale = lowered
        return changed

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.bad_evaluations = int(state["bad_evaluations"])
        self.scale = float(state["scale"])


def gumbel_temperature(step: int, total_steps: int, start: float, end: float) -> float:
    """Exponential annealing from ``start`` at step 0 to ``end`` at the last step."""
    if total_steps <= 1:
        return end
    progress = min(1.0, step / (total_steps - 1))
    return start * (end / start) ** progress
