"""YouTokenToMe BPE models (DALLE-pytorch's ``--bpe_path``), through ``youtokentome`` (extra ``yttm``).

YouTokenToMe reserves ``<PAD>`` (id 0 unless trained otherwise), ``<UNK>``, ``<BOS>`` and ``<EOS>``. Captions are
encoded without BOS/EOS, as DALLE-pytorch did, and padded with the model's ``<PAD>``; decoding drops padding and
BOS/EOS anywhere. A model trained without ``<PAD>`` gets ``pad_id`` if given, else a new id past its vocabulary.
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
from dalle_tokenizers.padding import choose_pad_id, vocab_size_with_padding
from dalle_tokenizers.specs import read_options, saved_file, write_spec

FILE_NAME = "yttm.model"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<PAD>", "<BOS>", "<EOS>"


@dataclass(frozen=True)
class YttmOptions:
    """What ``spec.json`` records for a YouTokenToMe tokenizer (the model file is saved beside it)."""

    pad_id: int | None = None


def check_model_format(path: Path) -> None:
    """Check the layout of a YouTokenToMe model file, which its C++ loader would answer with an abort, not an error.

    The file is text: ``chars merges``; one ``codepoint id`` line per character; one ``left right id`` line per merge;
    then the special ids ``unk pad bos eos``.
    """
    if not path.is_file():
        raise ConfigError(f"path: expected a YouTokenToMe model file, found no file at {path}")
    try:
        lines = path.read_text(encoding="utf-8").strip().split("\n")
        rows = [[int(field) for field in line.split()] for line in lines]
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"path: {path} is not a YouTokenToMe model: expected lines of integers") from None
    header = rows[0] if rows else []
    expected = 1 + header[0] + header[1] + 1 if len(header) == 2 else -1
    widths = [2] + [2] * header[0] + [3] * header[1] + [4] if expected == len(rows) else []
    if not widths or any(len(row) != width for row, width in zip(rows, widths, strict=True)):
        raise ConfigError(
            f"path: {path} is not a YouTokenToMe model: expected a 'chars merges' header, that many "
            f"character and merge lines, and a line of 4 special ids"
        )


def read_model_file(path: Path) -> Any:
    """A ``youtokentome.BPE`` from a model file."""
    youtokentome = require_extra("youtokentome", "dalle-tokenizers", "yttm")
    check_model_format(path)
    try:
        return youtokentome.BPE(model=str(path), n_threads=1)
    except Exception as error:  # its C++ core raises plain Exception for a malformed file
        raise ConfigError(f"path: {path} is not a YouTokenToMe model: {str(error)[:200]}") from None


class YttmTokenizer:
    """A YouTokenToMe BPE model as a dalle text tokenizer."""

    kind = "yttm"

    def __init__(self, path: str | Path, pad_id: int | None = None) -> None:
        self.path = Path(path)
        self._bpe = read_model_file(self.path)
        self._youtokentome = require_extra("youtokentome", "dalle-tokenizers", "yttm")
        vocabulary: list[str] = self._bpe.vocab()
        self.base_vocab_size = len(vocabulary)
        ids = {token: index for index, token in enumerate(vocabulary)}
        self._pad_id = choose_pad_id(self.base_vocab_size, ids.get(PAD_TOKEN), pad_id)
        self.options = YttmOptions(pad_id=self._pad_id)
        self._special_ids = [ids[token] for token in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN) if token in ids]

    @property
    def vocab_size(self) -> int:
        """Exact: YouTokenToMe may learn fewer tokens than the ``vocab_size`` it was trained with."""
        return vocab_size_with_padding(self.base_vocab_size, self.pad_id)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._bpe.encode(texts, output_type=self._youtokentome.OutputType.ID)

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
        if not rows:
            return []
        return [text.strip() for text in self._bpe.decode(rows, ignore_ids=self._special_ids)]

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            shutil.copyfile(self.path, staging / FILE_NAME)
            write_spec(staging, self.kind, self.options)

    @classmethod
    def load(cls, directory: Path) -> YttmTokenizer:
        options = read_options(directory, cls.kind, YttmOptions)
        return cls(saved_file(directory, FILE_NAME), options.pad_id)
