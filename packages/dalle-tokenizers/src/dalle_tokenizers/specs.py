"""Reading and writing ``spec.json``: the ``kind``, the tokenizer's options, and the files copied beside it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from dalle_core.checkpoint import read_json, write_json
from dalle_core.config import from_dict, to_dict
from dalle_core.errors import CheckpointError, ConfigError

SPEC_FILE = "spec.json"
T = TypeVar("T")


def write_spec(directory: Path, kind: str, options: Any) -> None:
    """Write ``{"kind": kind, **options}`` to ``directory/spec.json`` (``options`` is a config dataclass)."""
    write_json(directory / SPEC_FILE, {"kind": kind, **to_dict(options)})


def read_options(directory: str | Path, kind: str, cls: type[T]) -> T:
    """The options saved by :func:`write_spec` in ``directory``, validated as ``cls``."""
    path = Path(directory) / SPEC_FILE
    spec = read_json(path)
    if spec.get("kind") != kind:
        raise CheckpointError(f"{path}: expected kind {kind!r}, got {spec.get('kind')!r}")
    fields = {key: value for key, value in spec.items() if key != "kind"}
    try:
        return from_dict(cls, fields)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None


def saved_file(directory: str | Path, name: str) -> Path:
    """``directory/name``, which ``save`` copied there; a missing one is an incomplete checkpoint."""
    path = Path(directory) / name
    if not path.is_file():
        raise CheckpointError(f"{directory}: expected the tokenizer file {name} beside {SPEC_FILE}, found none")
    return path
