"""A dependency-free UTF-8 byte tokenizer: every script, emoji and accent is representable, nothing to train.

Id 0 is padding; byte ``b`` is id ``b + 1``; so the vocabulary has exactly 257 ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_core.checkpoint import atomic_directory
from dalle_tokenizers.fixed_length import pack_rows, rows_to_decode
from dalle_tokenizers.specs import read_options, write_spec

PAD_ID = 0
BYTE_OFFSET = 1


@dataclass(frozen=True)
class SimpleOptions:
    """What ``spec.json`` records for a simple tokenizer."""

    lowercase: bool = False


class SimpleTokenizer:
    """UTF-8 bytes as tokens, after collapsing whitespace (and lowercasing, if asked)."""

    kind = "simple"

    def __init__(self, lowercase: bool = False) -> None:
        self.options = SimpleOptions(lowercase=lowercase)

    @property
    def lowercase(self) -> bool:
        return self.options.lowercase

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

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def encode(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor:
        return pack_rows(texts, self.tokenize_batch, context_length, PAD_ID, truncate)

    def decode(self, ids: torch.Tensor) -> list[str]:
        texts = []
        for row in rows_to_decode(ids, self.vocab_size):
            data = bytes(i - BYTE_OFFSET for i in row if i != PAD_ID)
            # A truncated row may end inside a multi-byte character: drop the broken tail, keep the rest.
            texts.append(data.decode("utf-8", errors="ignore"))
        return texts

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            write_spec(staging, self.kind, self.options)

    @classmethod
    def load(cls, directory: Path) -> SimpleTokenizer:
        options = read_options(directory, cls.kind, SimpleOptions)
        return cls(lowercase=options.lowercase)
