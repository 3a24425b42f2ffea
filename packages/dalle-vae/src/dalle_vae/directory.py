"""Tokenizer directories (``spec.json`` + ``config.json`` + ``model.safetensors``) and strict weight loading.

Every tokenizer in this package saves itself the same way, so ``dalle_core.registry.load_image_tokenizer`` can rebuild
any of them, and loads weights strictly: a missing, unexpected or mis-shaped tensor is a CheckpointError, never a
silently random weight.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from dalle_core.checkpoint import atomic_directory, load_weights, read_json, save_weights, write_json
from dalle_core.errors import CheckpointError, ConfigError
from dalle_core.registry import SPEC_FILE


def save_tokenizer_dir(
    directory: str | Path, kind: str, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]
) -> None:
    """Atomically write ``spec.json`` (``{"kind": kind}``), ``config.json`` and ``model.safetensors``."""
    with atomic_directory(directory) as staging:
        write_json(staging / SPEC_FILE, {"kind": kind})
        save_weights(staging, state_dict, config)


def read_tokenizer_dir(directory: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a directory written by :func:`save_tokenizer_dir`; ``spec.json`` may be absent but must not disagree."""
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if spec_path.is_file():
        found = read_json(spec_path).get("kind")
        if found != kind:
            raise CheckpointError(f"{spec_path}: expected kind {kind!r}, got {found!r}")
    return load_weights(directory)


def describe_keys(keys: list[str], limit: int = 5) -> str:
    """``a, b, c (+4 more)`` or ``none``."""
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"


def load_state_strictly(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Copy ``state`` into ``model``; every key must exist on both sides with the same shape, else CheckpointError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the config: missing keys {describe_keys(missing)}, "
            f"unexpected keys {describe_keys(unexpected)}"
        )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: weight {name} is a {type(tensor).__name__}, expected a tensor")
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(dict(state), strict=True)


ModelT = TypeVar("ModelT", bound=nn.Module)


def load_tokenizer_model(
    model_cls: type[ModelT], read_config: Callable[[dict[str, Any]], Any], directory: str | Path
) -> ModelT:
    """Rebuild ``model_cls(read_config(config.json))`` from a directory written by :func:`save_tokenizer_dir`,
    strictly, in eval mode."""
    directory = Path(directory)
    config_dict, state = read_tokenizer_dir(directory, model_cls.kind)  # type: ignore[attr-defined]
    try:
        config = read_config(config_dict)
    except ConfigError as error:
        raise CheckpointError(f"{directory / 'config.json'}: {error}") from None
    model = model_cls(config)
    load_state_strictly(model, state, directory)
    return model.eval()
