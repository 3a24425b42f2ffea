"""The two interfaces every image and text tokenizer implements.

They are structural (``typing.Protocol``): a third-party class satisfies them by having these members, without
importing or subclassing anything from dalle. ``dalle_core.testing`` has contract tests that prove it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    """Turns images into a grid of discrete codes and back (a discrete VAE, a VQGAN, ...).

    Shapes: ``image_seq_len = fmap_size ** 2``.

    - ``encode(images)``: ``float32[B, channels, image_size, image_size]`` with values in ``[0, 1]`` ->
      ``int64[B, image_seq_len]`` with values in ``[0, num_tokens)``, row-major over the ``fmap_size`` grid.
      Deterministic for a model in eval mode. Raises :class:`dalle_core.errors.ShapeError` for a wrong shape.
    - ``decode(ids)``: ``int64[B, image_seq_len]`` -> ``float32[B, channels, image_size, image_size]`` in ``[0, 1]``.
      Raises :class:`dalle_core.errors.VocabularyError` for ids outside ``[0, num_tokens)``.
    - ``save(directory)``: writes ``spec.json`` (with ``"kind"``, the registry name) and whatever else is needed so that
      ``dalle_core.registry.load_image_tokenizer(directory)`` rebuilds an identical tokenizer.
    """

    kind: str

    @property
    def num_tokens(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def channels(self) -> int: ...

    @property
    def fmap_size(self) -> int: ...

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor) -> torch.Tensor: ...

    def save(self, directory: Path) -> None: ...


@runtime_checkable
class TextTokenizer(Protocol):
    """Turns captions into fixed-length rows of token ids and back.

    - ``encode(texts, context_length, truncate=False)``: ``n`` strings -> ``int64[n, context_length]``, each row the
      text's ids followed by ``pad_id``. A text longer than ``context_length`` raises
      :class:`dalle_core.errors.TextTooLongError` (naming its length and the limit) unless ``truncate`` is true.
    - ``decode(ids)``: ``int64[n, L]`` -> ``n`` strings, padding and special tokens dropped.
    - ``vocab_size``: the exact number of ids ``encode`` can produce (all ids are in ``[0, vocab_size)``); a
      transformer's text embedding must have exactly this many rows.
    - ``save(directory)``: writes ``spec.json`` (with ``"kind"``) so that
      ``dalle_core.registry.load_text_tokenizer(directory)`` rebuilds an identical tokenizer.
    """

    kind: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, texts: Sequence[str], context_length: int, truncate: bool = False) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor) -> list[str]: ...

    def save(self, directory: Path) -> None: ...
