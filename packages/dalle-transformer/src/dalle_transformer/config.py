"""The transformer's hyper-parameters: a frozen dataclass validated on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dalle_core.config import from_dict, to_dict
from dalle_core.errors import ConfigError


@dataclass(frozen=True)
class DALLEConfig:
    """Sizes of a DALLE transformer over ``[BOS, text ids, image ids]``.

    ``num_text_tokens`` is exactly the text tokenizer's ``vocab_size``; the model adds ``text_seq_len`` per-position
    padding tokens on top of it. ``image_fmap_size`` is the side of the image tokenizer's feature map, so an image is
    ``image_fmap_size ** 2`` tokens drawn from ``num_image_tokens`` codes.
    """

    num_text_tokens: int
    text_seq_len: int
    num_image_tokens: int
    image_fmap_size: int
    text_pad_id: int = 0
    dim: int = 256
    depth: int = 4
    heads: int = 8
    dim_head: int = 32
    ff_mult: int = 4
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    loss_img_weight: float = 7.0

    def __post_init__(self) -> None:
        for name in (
            "num_text_tokens",
            "text_seq_len",
            "num_image_tokens",
            "image_fmap_size",
            "dim",
            "depth",
            "heads",
            "dim_head",
            "ff_mult",
        ):
            _positive_int(name, getattr(self, name))
        pad = self.text_pad_id
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < self.num_text_tokens:
            raise ConfigError(
                f"DALLEConfig.text_pad_id: expected an integer in [0, num_text_tokens={self.num_text_tokens}), "
                f"got {pad!r}"
            )
        for name in ("attn_dropout", "ff_dropout"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value < 1.0:
                raise ConfigError(f"DALLEConfig.{name}: expected a probability in [0, 1), got {value!r}")
        if not _is_number(self.loss_img_weight) or not self.loss_img_weight >= 0.0:
            raise ConfigError(f"DALLEConfig.loss_img_weight: expected a number >= 0, got {self.loss_img_weight!r}")

    @property
    def image_seq_len(self) -> int:
        """Number of image tokens per image: ``image_fmap_size ** 2``."""
        return self.image_fmap_size**2

    @property
    def total_seq_len(self) -> int:
        """``text_seq_len + image_seq_len``: also the transformer's input length (BOS in, last image token out)."""
        return self.text_seq_len + self.image_seq_len

    @property
    def num_text_logits(self) -> int:
        """Width of the text logits: the text vocabulary plus one padding token per text position."""
        return self.num_text_tokens + self.text_seq_len

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DALLEConfig:
        return from_dict(cls, data)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"DALLEConfig.{name}: expected a positive integer, got {value!r}")
