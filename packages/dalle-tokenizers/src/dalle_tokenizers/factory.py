"""Build a text tokenizer from a kind name, an optional file, and options (what a config or a CLI flag gives)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dalle_core import registry
from dalle_core.errors import ConfigError
from dalle_core.protocols import TextTokenizer

# Kinds whose tokenizer is a file: the file is their first argument, and they cannot be built without it.
NEEDS_FILE = {"hf": "a tokenizer.json", "yttm": "a YouTokenToMe .model file"}


def build_text_tokenizer(kind: str, path: str | Path | None = None, **options: Any) -> TextTokenizer:
    """A new tokenizer of ``kind`` (``simple``, ``clip-bpe``, ``hf``, ``yttm`` or any registered kind).

    ``path`` is the tokenizer's file: required for ``hf`` and ``yttm``, CLIP's vocabulary for ``clip-bpe`` (found in
    ``open-clip-torch`` when omitted), not accepted by ``simple``. ``options`` go to the class, e.g.
    ``build_text_tokenizer("clip-bpe", add_special_tokens=False)``, ``build_text_tokenizer("simple", lowercase=True)``.
    """
    if kind in NEEDS_FILE and path is None:
        raise ConfigError(f"path: a {kind!r} text tokenizer needs {NEEDS_FILE[kind]}, got none")
    if kind == "simple" and path is not None:
        raise ConfigError(f"path: the 'simple' text tokenizer takes no file, got {str(path)!r}")
    cls = registry.resolve(registry.TEXT_TOKENIZERS, kind)
    try:
        return cls(**options) if path is None else cls(path, **options)
    except TypeError as error:  # an option the class does not take
        raise ConfigError(f"{kind} text tokenizer: {error}") from None
