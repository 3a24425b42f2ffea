"""Choosing the padding id, and the vocabulary size that follows from it.

A tokenizer whose vocabulary has a padding token uses it. One without may be given any id; by default it gets a new
id just past its vocabulary, so padding can never be confused with a real token (the transformer's embedding then has
one more row: ``vocab_size`` reports it).
"""

from __future__ import annotations

from dalle_core.errors import ConfigError

COMMON_PAD_TOKENS = ("<pad>", "[PAD]", "<PAD>", "<|pad|>", "[pad]")


def choose_pad_id(base_vocab_size: int, found: int | None, requested: int | None) -> int:
    """``requested`` if given, else the vocabulary's own pad id ``found``, else the new id ``base_vocab_size``."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or not 0 <= requested <= base_vocab_size:
            raise ConfigError(
                f"pad_id: expected an integer in [0, {base_vocab_size}] ({base_vocab_size} adds a padding id), "
                f"got {requested!r}"
            )
        return requested
    return found if found is not None else base_vocab_size


def vocab_size_with_padding(base_vocab_size: int, pad_id: int) -> int:
    """The exact number of ids: the base vocabulary, plus one when padding got an id of its own."""
    return max(base_vocab_size, pad_id + 1)
