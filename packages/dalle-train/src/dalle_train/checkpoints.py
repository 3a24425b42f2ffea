"""Resumable, self-describing training checkpoints, written atomically, the newest ``keep_last`` kept.

::

    RUN/checkpoints/step-00000500/
        model/              what the stage produces, ready to use: a generation bundle (transformer + both
                            tokenizers, for ``dalle generate --checkpoint``) or a VAE directory; EMA weights if on
        state/              the backend's resumable state: full weights + optimizer state keyed by parameter name
        training_state.pt   step, LR-plateau state, loss scaler, counters, RNG and data position of every process
        run.json            the stage's config, the whole run config, backend and world size (informational)

``training_state.pt`` holds tensors and plain containers only and is loaded with ``weights_only=True``. A directory
is only complete once renamed into place, so a run killed at any moment leaves the previous checkpoint intact; the
staging directories it may leave behind are removed at the next start.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dalle_core.checkpoint import atomic_directory, read_json, write_json
from dalle_core.errors import CheckpointError

STATE_FILE = "training_state.pt"
MODEL_DIR = "model"
BACKEND_STATE_DIR = "state"
RUN_FILE = "run.json"
STATE_FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step-{step:08d}"


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


def remove_stale_staging(run_dir: Path) -> None:
    """Delete staging directories left by a run killed while writing a checkpoint."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".step-") and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def prune(run_dir: Path, keep_last: int) -> None:
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    numpy_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "python": [version, list(mt_state), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))


# ------------------------------------------------------------------------------------------------------------ write


def write_checkpoint(
    run_dir: Path,
    step: int,
    is_main: bool,
    share_path: Callable[[str | None], str],
    write_parts: Callable[[Path], None],
    keep_last: int,
) -> Path:
    """Write ``step-N/`` atomically: ``write_parts(staging)`` runs on every process (it holds the collectives) and
    the main process renames the finished directory into place, then prunes old checkpoints.

    ``share_path`` sends the main process's staging path to the others (a broadcast under torch.distributed).
    """
    target = step_dir(run_dir, step)
    if not is_main:
        write_parts(Path(share_path(None)))
        return target
    with atomic_directory(target) as staging:
        write_parts(Path(share_path(str(staging))))
    prune(run_dir, keep_last)
    return target


def save_training_state(directory: Path, state: dict[str, Any]) -> None:
    torch.save({"format": STATE_FORMAT, **state}, directory / STATE_FILE)


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The ``training_state.pt`` of ``checkpoint`` (``step`` is the number of steps done)."""
    path = checkpoint / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint} is not a training checkpoint: expected {STATE_FILE}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path}: training state format {state.get('format')!r}, this version reads {STATE_FORMAT}; "
            f"start afresh (--fresh) or use the version that wrote it"
        )
    return state


def write_run_info(directory: Path, info: dict[str, Any]) -> None:
    write_json(directory / RUN_FILE, info)


def read_run_info(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / RUN_FILE
    return read_json(path) if path.is_file() else {}
