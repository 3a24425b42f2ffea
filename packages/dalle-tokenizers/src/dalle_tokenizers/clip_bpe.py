"""CLIP's byte-level BPE (49408 ids), the text tokenizer DALLE-pytorch uses by default.

Cleaning is CLIP's: ``ftfy.fix_text``, HTML entities unescaped (twice), whitespace collapsed, lowercase. Ids equal
``open_clip.tokenize``'s for every non-empty text that fits, with the default options (start and end of text added,
padding 0). Deliberate differences, each because our contract needs it:

- an empty caption is all padding (it is the "no caption" row of classifier-free guidance), not start + end;
- truncation keeps the first ``context_length`` ids (a prefix), without moving the end-of-text token into the last slot;
- ``<start_of_text>`` typed inside a caption is ordinary text, not the special token.

``add_special_tokens=False, pad_id=0`` gives DALLE-pytorch's ids (its tokenizer adds neither). Padding with 0 shares
the id of ``"!"`` inside a word (``"!!"`` is ``"!"`` then ``"!</w>"``, id 256): decoding drops only the zeros after the
end-of-text token or at the end of the row, so text decodes exactly unless truncation cut right after such a ``"!"``;
but a transformer that treats every ``pad_id`` as padding (DALLE-pytorch's does) also hides that ``"!"``.
``pad_id=49408`` gives padding an id of its own (``vocab_size`` is then 49409).
"""

from __future__ import annotations

import functools
import html
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_core.checkpoint import atomic_directory
from dalle_tokenizers.clip_vocab import (
    END_OF_TEXT,
    END_OF_WORD,
    START_OF_TEXT,
    VOCAB_FILE_NAME,
    byte_symbols,
    clip_vocabulary,
    find_clip_vocabulary,
    read_merges,
)
from dalle_tokenizers.fixed_length import pack_rows, rows_to_decode, strip_trailing
from dalle_tokenizers.padding import choose_pad_id, vocab_size_with_padding
from dalle_tokenizers.specs import read_options, saved_file, write_spec

CLIP_VOCAB_SIZE = 49408
# CLIP splits text into words (runs of letters), single digits, and runs of other non-space symbols.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class ClipBpeOptions:
    """What ``spec.json`` records for a CLIP BPE tokenizer (the vocabulary file is saved beside it)."""

    add_special_tokens: bool = True
    pad_id: int = 0


def clean_caption(text: str) -> str:
    """CLIP's cleaning: repair mojibake, unescape HTML, collapse whitespace, lowercase."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def merge_word(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word: repeatedly join every occurrence of its best-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        index = 0
        while index < len(symbols):
            if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best:
                merged.append(symbols[index] + symbols[index + 1])
                index += 2
            else:
                merged.append(symbols[index])
                index += 1
        symbols = merged
    return symbols


class ClipBpeTokenizer:
    """CLIP's BPE from ``vocab_path`` or, when it is None, from the installed ``open-clip-torch``."""

    kind = "clip-bpe"

    def __init__(self, vocab_path: str | Path | None = None, add_special_tokens: bool = True, pad_id: int = 0) -> None:
        import regex

        self.vocab_path = Path(vocab_path) if vocab_path is not None else find_clip_vocabulary()
        merges = read_merges(self.vocab_path)
        self.options = ClipBpeOptions(
            add_special_tokens=add_special_tokens, pad_id=choose_pad_id(CLIP_VOCAB_SIZE, None, pad_id)
        )
        self._tokens = clip_vocabulary(merges)
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._byte_symbols = byte_symbols()
        self._symbol_bytes = {symbol: byte for byte, symbol in enumerate(self._byte_symbols)}
        self._pattern = regex.compile(WORD_PATTERN, regex.IGNORECASE)
        self.start_id = self._ids[START_OF_TEXT]
        self.end_id = self._ids[END_OF_TEXT]
        # Captions repeat words endlessly; the merge loop is the slow part.
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._uncached_word_ids)

    @property
    def add_special_tokens(self) -> bool:
        return self.options.add_special_tokens

    @property
    def vocab_size(self) -> int:
        return vocab_size_with_padding(CLIP_VOCAB_SIZE, self.options.pad_id)

    @property
    def pad_id(self) -> int:
        return self.options.pad_id

    def _uncached_word_ids(self, word: str) -> tuple[int, ...]:
        symbols = [self._byte_symbols[byte] for byte in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        return tuple(self._ids[token] for token in merge_word(symbols, self._ranks))

    def tokenize(self, text: str) -> list[int]:
        """The ids of one text, without padding; an empty caption has none, not even start and end of text."""
        ids = [token for word in self._pattern.findall(clean_caption(text)) for token in self._word_ids(word)]
        if ids and self.add_special_tokens:
            return [self.start_id, *ids, self.end_id]
        return ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenize(text) for text in texts]

    def encode(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor:
        return pack_rows(texts, self.tokenize_batch, context_length, self.pad_id, truncate)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [self._decode_row(row) for row in rows_to_decode(ids, self.vocab_size)]

    def _decode_row(self, row: list[int]) -> str:
        if self.end_id in row:
            row = row[: row.index(self.end_id)]
        row = strip_trailing(row, self.pad_id)
        data = bytearray()
        for index in row:
            if index >= CLIP_VOCAB_SIZE or index in (self.start_id, self.end_id):
                continue  # a padding id of its own, or a special token inside the row
            token = self._tokens[index]
            word_ends = token.endswith(END_OF_WORD)
            data.extend(self._symbol_bytes[char] for char in token.removesuffix(END_OF_WORD))
            if word_ends:
                data.extend(b" ")
        # A truncated row may end inside a multi-byte character: drop the broken bytes, keep the rest.
        return data.decode("utf-8", errors="ignore").strip()

    def save(self, directory: Path) -> None:
        with atomic_directory(directory) as staging:
            # The vocabulary goes along, so a checkpoint decodes without open-clip-torch installed.
            shutil.copyfile(self.vocab_path, staging / VOCAB_FILE_NAME)
            write_spec(staging, self.kind, self.options)

    @classmethod
    def load(cls, directory: Path) -> ClipBpeTokenizer:
        options = read_options(directory, cls.kind, ClipBpeOptions)
        return cls(saved_file(directory, VOCAB_FILE_NAME), options.add_special_tokens, options.pad_id)
