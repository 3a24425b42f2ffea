"""Resumable training checkpoints: ``RUN/checkpoints/step-00000500/{model/, training_state.pt}``.

Each is written atomically; only the newest ``keep_last`` are kept. ``training_state.pt`` holds the optimizer, the
step, the global torch RNG and the data sampler's generator, so a resumed run continues exactly where it stopped.
It is loaded with ``weights_only=True``: it contains tensors and plain containers only.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dalle_core.checkpoint import atomic_directory
from dalle_core.errors import CheckpointError

STATE_FILE = "training_state.pt"
MODEL_DIR = "model"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted writes are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    write_model: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator,
    keep_last: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``step-N/`` atomically (``write_model`` fills ``model/``), then delete all but the newest ``keep_last``."""
    target = checkpoints_dir(run_dir) / f"step-{step:08d}"
    with atomic_directory(target) as staging:
        write_model(staging / MODEL_DIR)
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_rng": data_generator.get_state(),
            "extra": extra or {},
        }
        torch.save(state, staging / STATE_FILE)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_training_state(
    checkpoint: Path, optimizer: torch.optim.Optimizer, data_generator: torch.Generator
) -> dict[str, Any]:
    """Restore optimizer and RNGs from ``checkpoint`` and return the state dict (``step`` is the steps done)."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint: expected {STATE_FILE}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    data_generator.set_state(state["data_rng"])
    return state
