"""Find image and text tokenizers by name, lazily, through entry points.

A package adds an implementation by declaring, in its ``pyproject.toml``::

    [project.entry-points."dalle.image_tokenizers"]
    my_vae = "my_package.module:MyVAE"

The class needs a ``kind`` attribute equal to that name and a ``load(directory)`` classmethod that rebuilds it from
what its ``save(directory)`` wrote. Nothing is imported until a name is asked for.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dalle_core.checkpoint import read_json
from dalle_core.errors import CheckpointError, RegistryError
from dalle_core.protocols import ImageTokenizer, TextTokenizer

IMAGE_TOKENIZERS = "dalle.image_tokenizers"
TEXT_TOKENIZERS = "dalle.text_tokenizers"
SPEC_FILE = "spec.json"

# Registrations made at run time (tests, notebooks); they take precedence over entry points.
_extra: dict[str, dict[str, Any]] = {IMAGE_TOKENIZERS: {}, TEXT_TOKENIZERS: {}}


def register(group: str, name: str, cls: Any) -> None:
    """Register ``cls`` under ``name`` for this process (entry points are the way for installed packages)."""
    if group not in _extra:
        raise RegistryError(f"unknown registry group {group!r}; expected {IMAGE_TOKENIZERS} or {TEXT_TOKENIZERS}")
    _extra[group][name] = cls


def available(group: str) -> list[str]:
    """Names registered in ``group``, from entry points and run-time registrations."""
    return sorted({ep.name for ep in entry_points(group=group)} | set(_extra.get(group, {})))


def resolve(group: str, name: str) -> Any:
    """The class registered as ``name`` in ``group``, imported on first use."""
    if name in _extra.get(group, {}):
        return _extra[group][name]
    matches = [ep for ep in entry_points(group=group) if ep.name == name]
    if not matches:
        names = ", ".join(available(group)) or "none"
        raise RegistryError(f"no {group} entry named {name!r}; available: {names}")
    return matches[0].load()


def _load(group: str, directory: str | Path) -> Any:
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{directory}: expected {SPEC_FILE} naming the tokenizer kind, found none")
    spec = read_json(spec_path)
    kind = spec.get("kind")
    if not isinstance(kind, str):
        raise CheckpointError(f"{spec_path}: expected a string field 'kind', got {kind!r}")
    return resolve(group, kind).load(directory)


def load_image_tokenizer(directory: str | Path) -> ImageTokenizer:
    """Rebuild the image tokenizer saved in ``directory`` by its ``save`` method."""
    return _load(IMAGE_TOKENIZERS, directory)


def load_text_tokenizer(directory: str | Path) -> TextTokenizer:
    """Rebuild the text tokenizer saved in ``directory`` by its ``save`` method."""
    return _load(TEXT_TOKENIZERS, directory)
