"""A dependency-free UTF-8 byte tokenizer: every script, emoji and accent is representable, nothing to train.

Id 0 is padding; byte ``b`` is id ``b + 1``; so the vocabulary has exactly 257 ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dalle_core.checkpoint import atomic_directory, read_json, write_json
from dalle_core.errors import CheckpointError, ShapeError, TextTooLongError

PAD_ID = 0
BYTE_OFFSET = 1


class SimpleTokenizer:
    """UTF-8 bytes as tokens, optionally lowercasing and collapsing whitespace first."""

    kind = "simple"

    def __init__(self, lowercase: bool = False) -> None:
        self.lowercase = lowercase

    @property
    def vocab_size(self) -> int:
        return 256 + BYTE_OFFSET

    @property
    def pad_id(self) -> int:
        return PAD_ID

    def clean(self, text: str) -> str:
        text = " ".join(text.split())
        return text.lower() if self.lowercase else text

    def tokenize(self, text: str) -> list[int]:
        """The ids of one text, without padding."""
        return [byte + BYTE_OFFSET for byte in self.clean(text).encode("utf-8")]

    def encode(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("encode expects a sequence of strings, got a single str; wrap it in a list")
        if context_length < 1:
            raise ShapeError(f"context_length must be at least 1, got {context_length}")
        result = torch.full((len(texts), context_length), PAD_ID, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)
            if len(ids) > context_length:
                if not truncate:
                    raise TextTooLongError(
                        f"text {text[:30]!r}... is {len(ids)} tokens long, more than the context length "
                        f"{context_length}; shorten it or pass truncate=True"
                    )
                ids = ids[:context_length]
            result[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return result

    def decode(self, ids: torch.Tensor) -> list[str]:
        if ids.ndim != 2:
            raise ShapeError(f"expected token ids [n, length], got shape {tuple(ids.shape)}")
        texts = []
        for row in ids.tolist():
            data = bytes(i - BYTE_OFFSET for i in row if BYTE_OFFSET <= i < self.vocab_size)
            # A truncated row may end inside a multi-byte character: drop the broken tail, keep the rest.
            texts.append(data.decode("utf-8", errors="ignore"))
        return texts

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            write_json(staging / "spec.json", {"kind": self.kind, "lowercase": self.lowercase})

    @classmethod
    def load(cls, directory: Path) -> SimpleTokenizer:
        spec = read_json(Path(directory) / "spec.json")
        lowercase = spec.get("lowercase", False)
        if not isinstance(lowercase, bool):
            raise CheckpointError(f"{directory}/spec.json: expected 'lowercase' true or false, got {lowercase!r}")
        return cls(lowercase=lowercase)
