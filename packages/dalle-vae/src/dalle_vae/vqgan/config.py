"""The shape of a taming-transformers VQGAN (``VQModel`` or ``GumbelVQ``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dalle_core.config import from_dict, to_dict
from dalle_core.errors import ConfigError

GROUP_NORM_GROUPS = 32


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class VQGanConfig:
    """A VQGAN: taming's ``ddconfig`` fields (same names) plus the quantizer.

    - ``quantizer``: ``"vector"`` (taming's ``VQModel``: nearest codebook vector) or ``"gumbel"`` (``GumbelVQ``: a 1x1
      conv gives logits over the codes).
    - ``n_embed`` codes of ``embed_dim`` numbers; ``z_channels`` is the encoder's output width.
    - ``resolution`` is the training resolution: with ``attn_resolutions`` it decides where attention layers sit.
      ``image_size`` (default: ``resolution``) is what ``encode`` accepts; the networks are convolutional.
    - ``ch * ch_mult[i]`` channels at level ``i``; ``len(ch_mult) - 1`` halvings, so ``fmap_size = image_size /
      2**(len(ch_mult) - 1)`` (f16 for ``[1, 1, 2, 2, 4]``, f8 for ``[1, 1, 2, 4]``).
    """

    quantizer: Literal["vector", "gumbel"]
    n_embed: int
    embed_dim: int
    z_channels: int
    resolution: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    in_channels: int = 3
    out_ch: int = 3
    resamp_with_conv: bool = True
    image_size: int | None = None

    def __post_init__(self) -> None:
        if self.quantizer not in ("vector", "gumbel"):
            raise ConfigError(f"quantizer must be 'vector' or 'gumbel', got {self.quantizer!r}")
        for name in ("n_embed", "embed_dim", "z_channels", "resolution", "ch", "num_res_blocks", "in_channels"):
            _positive(name, getattr(self, name), 2 if name == "n_embed" else 1)
        if self.out_ch != self.in_channels:
            raise ConfigError(f"out_ch must equal in_channels ({self.in_channels}) for a tokenizer, got {self.out_ch}")
        if not isinstance(self.resamp_with_conv, bool):
            raise ConfigError(f"resamp_with_conv must be true or false, got {self.resamp_with_conv!r}")
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ConfigError(f"{name} must be a list of integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))  # hashable, and equal to a config read back from JSON
        if not self.ch_mult:
            raise ConfigError("ch_mult must list at least one multiplier")
        for value in self.ch_mult:
            _positive("ch_mult[]", value)
        for value in self.attn_resolutions:
            _positive("attn_resolutions[]", value)
        if self.ch % GROUP_NORM_GROUPS:  # every width is a multiple of ch, and GroupNorm uses 32 groups
            raise ConfigError(f"ch must be a multiple of {GROUP_NORM_GROUPS} (GroupNorm groups), got {self.ch}")
        if self.quantizer == "gumbel" and self.embed_dim != self.z_channels:
            # taming's GumbelQuantize reads quant_conv's embed_dim outputs through a conv built for z_channels.
            raise ConfigError(
                f"embed_dim must equal z_channels for a Gumbel quantizer, got {self.embed_dim} and {self.z_channels}"
            )
        if self.image_size is not None:
            _positive("image_size", self.image_size)
        if self.size % self.downsampling:
            raise ConfigError(
                f"image_size must be divisible by 2**(len(ch_mult) - 1)={self.downsampling}, got {self.size}"
            )

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def size(self) -> int:
        """The image size ``encode`` accepts: ``image_size`` or, if unset, ``resolution``."""
        return self.resolution if self.image_size is None else self.image_size

    @property
    def fmap_size(self) -> int:
        return self.size // self.downsampling

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQGanConfig:
        return from_dict(cls, data)
