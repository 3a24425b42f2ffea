"""The shape of OpenAI's dVAE (the ``dall_e`` package's Encoder and Decoder), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dalle_core.config import from_dict, to_dict
from dalle_core.errors import ConfigError

# Both networks have four groups of blocks, and three 2x poolings (upsamplings) between them: a fixed class attribute
# of dall_e's Encoder/Decoder, never a constructor argument, so never stored in their pickles either.
GROUP_COUNT = 4
DOWNSAMPLING = 2 ** (GROUP_COUNT - 1)


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class OpenAIDVAEConfig:
    """OpenAI's released dVAE is the default: 8192 codes, a 32x32 grid for 256 px images.

    Field names map to ``dall_e``'s: ``encoder_hidden`` is the Encoder's ``n_hid``, ``encoder_blocks_per_group`` its
    ``n_blk_per_group``; ``decoder_init``/``decoder_hidden``/``decoder_blocks_per_group`` are the Decoder's
    ``n_init``/``n_hid``/``n_blk_per_group``; ``vocab_size`` and ``channels`` (``input_channels`` /
    ``output_channels``) are shared. ``image_size`` is what ``encode`` accepts (the networks are convolutional;
    OpenAI and DALLE-pytorch use 256).
    """

    image_size: int = 256
    channels: int = 3
    vocab_size: int = 8192
    encoder_hidden: int = 256
    encoder_blocks_per_group: int = 2
    decoder_init: int = 128
    decoder_hidden: int = 256
    decoder_blocks_per_group: int = 2

    def __post_init__(self) -> None:
        _positive("image_size", self.image_size)
        _positive("channels", self.channels)
        _positive("vocab_size", self.vocab_size, 2)
        _positive("encoder_blocks_per_group", self.encoder_blocks_per_group)
        _positive("decoder_init", self.decoder_init)
        _positive("decoder_blocks_per_group", self.decoder_blocks_per_group)
        for name in ("encoder_hidden", "decoder_hidden"):
            value = getattr(self, name)
            _positive(name, value, 4)
            if value % 4:  # each block's bottleneck is a quarter of its width
                raise ConfigError(f"{name} must be a multiple of 4, got {value}")
        if self.image_size % DOWNSAMPLING:
            raise ConfigError(f"image_size must be divisible by {DOWNSAMPLING}, got {self.image_size}")

    @property
    def fmap_size(self) -> int:
        return self.image_size // DOWNSAMPLING

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpenAIDVAEConfig:
        return from_dict(cls, data)
