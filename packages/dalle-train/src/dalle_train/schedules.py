"""Learning-rate and temperature schedules as pure functions of the step (so a resumed run recomputes them)."""

from __future__ import annotations

import math

from dalle_train.config import OptimizerConfig


def learning_rate(step: int, total_steps: int, config: OptimizerConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay from ``lr`` to ``lr * min_lr_ratio`` at the last step."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, total_steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def gumbel_temperature(step: int, total_steps: int, start: float, end: float) -> float:
    """Exponential annealing from ``start`` at step 0 to ``end`` at the last step."""
    if total_steps <= 1:
        return end
    progress = min(1.0, step / (total_steps - 1))
    return start * (end / start) ** progress
