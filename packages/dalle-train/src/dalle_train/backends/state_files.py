"""The backend-neutral training-state format written by the single, DDP and FSDP backends.

``DIR/weights.safetensors`` holds the full (unsharded) model weights, ``DIR/optimizer.pt`` the full optimizer state
keyed by parameter name (not by position, so it survives wrapping and sharding), and ``DIR/format.json`` names the
format and the backend that wrote it. Any of the three backends resumes from what any other wrote, at any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dalle_core.checkpoint import read_json, write_json
from dalle_core.errors import CheckpointError

FULL_STATE_FORMAT = "dalle-train/full-state/1"
FORMAT_FILE = "format.json"
WEIGHTS_FILE = "weights.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def write_full_state(
    directory: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any], backend: str
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / WEIGHTS_FILE))
    torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    write_json(directory / FORMAT_FILE, {"format": FULL_STATE_FORMAT, "backend": backend})


def read_full_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and optimizer state of a full-state directory; a directory in another format raises."""
    info = read_json(directory / FORMAT_FILE) if (directory / FORMAT_FILE).is_file() else {}
    if info.get("format") != FULL_STATE_FORMAT:
        raise CheckpointError(
            f"{directory}: training state was written by backend {info.get('backend', 'unknown')!r} in format "
            f"{info.get('format')!r}; the single, ddp and fsdp backends read {FULL_STATE_FORMAT!r} only"
        )
    weights = load_file(str(directory / WEIGHTS_FILE))
    optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return weights, optimizer_state
