"""Any Hugging Face ``tokenizer.json`` (BPE, WordPiece, Unigram, ...) through the ``tokenizers`` package (extra ``hf``).

The file is read locally; nothing is downloaded. Padding: the tokenizer's own pad token (its padding settings, or a
special token named like ``<pad>``/``[PAD]``), else ``pad_id`` if given, else a new id just past the vocabulary.
Special tokens (``[CLS] ... [SEP]`` of a BERT template) are added as the file's post-processor says, unless
``add_special_tokens=False``; a caption that yields only special tokens (an empty one) is all padding.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_core.checkpoint import atomic_directory
from dalle_core.errors import ConfigError
from dalle_core.extras import require_extra
from dalle_tokenizers.fixed_length import pack_rows, rows_to_decode, strip_trailing
from dalle_tokenizers.padding import COMMON_PAD_TOKENS, choose_pad_id, vocab_size_with_padding
from dalle_tokenizers.specs import read_options, saved_file, write_spec

FILE_NAME = "tokenizer.json"


@dataclass(frozen=True)
class HfOptions:
    """What ``spec.json`` records for a Hugging Face tokenizer (``tokenizer.json`` is saved beside it)."""

    add_special_tokens: bool = True
    pad_id: int | None = None


def read_tokenizer_file(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` from a local ``tokenizer.json``."""
    tokenizers = require_extra("tokenizers", "dalle-tokenizers", "hf")
    if not path.is_file():
        raise ConfigError(f"path: expected a Hugging Face {FILE_NAME}, found no file at {path}")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception for any malformed file
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"path: {path} is not a Hugging Face {FILE_NAME}: {first_line}") from None


def own_pad_id(tokenizer: Any) -> int | None:
    """The pad id the tokenizer file declares: in its padding settings, or as a conventionally named token."""
    if tokenizer.padding is not None:
        return int(tokenizer.padding["pad_id"])
    for name in COMMON_PAD_TOKENS:
        found = tokenizer.token_to_id(name)
        if found is not None:
            return int(found)
    return None


class HfTokenizer:
    """A ``tokenizer.json`` (``path`` is the file or a directory holding it) as a dalle text tokenizer."""

    kind = "hf"

    def __init__(self, path: str | Path, add_special_tokens: bool = True, pad_id: int | None = None) -> None:
        self.path = Path(path) / FILE_NAME if Path(path).is_dir() else Path(path)
        self._tokenizer = read_tokenizer_file(self.path)
        found = own_pad_id(self._tokenizer)
        # Rows are padded and truncated here, to the caller's context length: the file's own settings would fight that.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        vocabulary = self._tokenizer.get_vocab(with_added_tokens=True)
        self.base_vocab_size = max(
            self._tokenizer.get_vocab_size(with_added_tokens=True), max(vocabulary.values(), default=-1) + 1
        )
        self._pad_id = choose_pad_id(self.base_vocab_size, found, pad_id)
        self.options = HfOptions(add_special_tokens=add_special_tokens, pad_id=self._pad_id)

    @property
    def add_special_tokens(self) -> bool:
        return self.options.add_special_tokens

    @property
    def vocab_size(self) -> int:
        return vocab_size_with_padding(self.base_vocab_size, self.pad_id)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [[] if all(encoding.special_tokens_mask) else list(encoding.ids) for encoding in encodings]

    def tokenize(self, text: str) -> list[int]:
        """The ids of one text, without padding."""
        return self.tokenize_batch([text])[0]

    def encode(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor:
        return pack_rows(texts, self.tokenize_batch, context_length, self.pad_id, truncate)

    def decode(self, ids: torch.Tensor) -> list[str]:
        rows = [
            [i for i in strip_trailing(row, self.pad_id) if i < self.base_vocab_size]
            for row in rows_to_decode(ids, self.vocab_size)
        ]
        return [text.strip() for text in self._tokenizer.decode_batch(rows, skip_special_tokens=True)]

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            shutil.copyfile(self.path, staging / FILE_NAME)
            write_spec(staging, self.kind, self.options)

    @classmethod
    def load(cls, directory: Path) -> HfTokenizer:
        options = read_options(directory, cls.kind, HfOptions)
        return cls(saved_file(directory, FILE_NAME), options.add_special_tokens, options.pad_id)
