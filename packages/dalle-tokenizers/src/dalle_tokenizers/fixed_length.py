"""Fixed-length rows of token ids: the part of ``TextTokenizer.encode``/``decode`` every tokenizer shares.

Each tokenizer turns one text into a list of ids; these helpers pad or truncate the lists into an ``int64`` tensor,
and check the shape and range of ids handed back for decoding, so every kind reports errors the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dalle_core.errors import ShapeError, TextTooLongError, VocabularyError


def check_texts(texts: Sequence[str]) -> None:
    """Reject a bare string: iterating it would encode each character as its own caption."""
    if isinstance(texts, str):
        raise TypeError("encode expects a sequence of strings, got a single str; wrap it in a list")


def pack_rows(
    texts: Sequence[str],
    tokenize_batch: Callable[[list[str]], list[list[int]]],
    context_length: int,
    pad_id: int,
    truncate: bool,
) -> torch.Tensor:
    """``int64[len(texts), context_length]``: each text's ids, then ``pad_id`` up to ``context_length``.

    ``tokenize_batch`` maps a list of texts to their lists of ids, without padding (one call, so a tokenizer can batch).

    A text longer than the context raises :class:`TextTooLongError` naming both lengths, unless ``truncate``, which
    keeps the first ``context_length`` ids (a prefix of the untruncated row, whatever special tokens it holds).
    """
    check_texts(texts)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise ShapeError(f"context_length must be an integer of at least 1, got {context_length!r}")
    rows = torch.full((len(texts), context_length), pad_id, dtype=torch.int64)
    id_lists = tokenize_batch(list(texts))
    for index, (text, ids) in enumerate(zip(texts, id_lists, strict=True)):
        if len(ids) > context_length:
            if not truncate:
                raise TextTooLongError(
                    f"text {text[:30]!r}... is {len(ids)} tokens long, more than the context length "
                    f"{context_length}; shorten it or pass truncate=True"
                )
            ids = ids[:context_length]
        if ids:
            rows[index, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    return rows


def rows_to_decode(ids: torch.Tensor, vocab_size: int) -> list[list[int]]:
    """The rows of ``ids`` as lists, after checking they are ``[n, length]`` integers in ``[0, vocab_size)``."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ShapeError(f"expected token ids as a tensor [n, length], got {shape}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ShapeError(f"expected integer token ids, got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise VocabularyError(f"token id {bad} is outside the text vocabulary [0, {vocab_size})")
    return ids.tolist()


def strip_trailing(row: list[int], pad_id: int) -> list[int]:
    """``row`` without the run of ``pad_id`` at its end (a pad id inside the text may be a real token)."""
    end = len(row)
    while end and row[end - 1] == pad_id:
        end -= 1
    return row[:end]
