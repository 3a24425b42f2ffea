"""Local weight files: metrics never download; a missing file is one error naming it and where to get it."""

from __future__ import annotations

from pathlib import Path

from dalle_core.errors import CheckpointError


class MissingWeightsError(CheckpointError):
    """A metric's weight file is not where the user said (or where the default says) it is."""


def require_weights(path: str | Path | None, what: str, hint: str) -> Path:
    """Return ``path`` if it is a file; else raise :class:`MissingWeightsError` saying what is missing and ``hint``.

    ``hint`` tells where to get the file and how to pass it, e.g. "download X from URL and pass --inception-weights".
    """
    if path is None:
        raise MissingWeightsError(f"{what}: no weights file given; {hint}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{what}: weights file not found at {path}; {hint}")
    return path
