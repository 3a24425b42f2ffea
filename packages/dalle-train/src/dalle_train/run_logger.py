"""Where a training loop reports: a rich progress bar (with tokens/s and ETA), ``metrics.jsonl``, and optionally
TensorBoard and Weights & Biases. Only the main process writes; the loop calls :meth:`RunLogger.log` every
``log_every`` steps with plain floats, so nothing here touches the GPU or slows a step.

TensorBoard (extra ``tensorboard``) and W&B (extra ``wandb``) are imported only when turned on. W&B runs in
``offline`` mode unless ``logging.wandb_mode=online``: offline runs write under ``RUN/wandb/`` and never open a
network connection (``wandb sync`` uploads them later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import Progress, TaskID

from dalle_core.extras import require_extra
from dalle_train.progress import MetricsLog, console, make_progress
from dalle_train.run_config import LoggingConfig


class RunLogger:
    """Progress, metrics files and dashboards of one stage (``RUN`` is its directory)."""

    def __init__(self, run_dir: Path, config: LoggingConfig | None = None, enabled: bool = True) -> None:
        self.run_dir = run_dir
        self.config = config or LoggingConfig()
        self.enabled = enabled
        self.jsonl = MetricsLog(run_dir / "metrics.jsonl") if enabled and self.config.jsonl else None
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._tensorboard: Any = None
        self._wandb: Any = None

    def start(self, description: str, total: int, completed: int, run_config: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.truncate_after(completed)
        if self.config.tensorboard:
            tensorboard = require_extra(
                "torch.utils.tensorboard", "dalle-train", "tensorboard", top_level="tensorboard"
            )
            self._tensorboard = tensorboard.SummaryWriter(
                log_dir=str(self.run_dir / "tensorboard"), purge_step=completed + 1
            )
        if self.config.wandb:
            wandb = require_extra("wandb", "dalle-train", "wandb")
            self._wandb = wandb.init(
                project=self.config.wandb_project,
                name=f"{self.run_dir.parent.name}/{self.run_dir.name}",
                dir=str(self.run_dir),
                mode=self.config.wandb_mode,
                config=run_config,
                resume="allow",
                id=_wandb_id(self.run_dir),
            )
        if self.config.progress:
            self._progress = make_progress()
            self._progress.start()
            self._task = self._progress.add_task(description, total=total, completed=completed, status="")

    def advance(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)

    def log(self, step: int, metrics: dict[str, float], status: str = "") -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(step, **metrics)
        if self._tensorboard is not None:
            for name, value in metrics.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if status and self._progress is not None and self._task is not None:
            self._progress.update(self._task, status=status)

    def message(self, text: str) -> None:
        if self.enabled:
            console.print(text)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run directory, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
