"""The hyperparameters of :class:`dalle_vae.DiscreteVAE`, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dalle_core.config import from_dict, to_dict
from dalle_core.errors import ConfigError

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def _normalization(value: Any, channels: int) -> Normalization | None:
    """Validate ``normalization`` and return it as a tuple of two float tuples (or None)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ConfigError(f"normalization must be a pair (means, stds) or null, got {value!r}")
    parts = []
    for label, values in zip(("means", "stds"), value, strict=True):
        if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)) or len(values) != channels:
            raise ConfigError(f"normalization {label} must have one number per channel ({channels}), got {values!r}")
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                raise ConfigError(f"normalization {label} must be finite numbers, got {values!r}")
        parts.append(tuple(float(item) for item in values))
    if any(std <= 0 for std in parts[1]):
        raise ConfigError(f"normalization stds must all be > 0, got {parts[1]!r}")
    return parts[0], parts[1]


@dataclass(frozen=True)
class DiscreteVAEConfig:
    """Shape and training hyperparameters of a Gumbel-softmax discrete VAE.

    Every DALLE-pytorch ``DiscreteVAE`` option has a field of the same name and meaning (see
    :mod:`dalle_vae.dalle_pytorch` for importing its ``vae.pt`` files), plus ``decoder_input_conv``.

    - ``normalization`` is ``((mean per channel), (std per channel))`` applied to ``[0, 1]`` inputs before the encoder;
      the decoder is trained to output the normalized image and ``decode`` undoes it. ``None`` means none.
    - ``straight_through``: feed exact one-hot codes to the decoder, with the soft sample's gradients.
    - ``reinmax`` (needs ``straight_through``): ReinMax's second-order gradient estimate instead of straight-through.
    - ``decoder_input_conv``: start the decoder with a 1x1 conv from ``codebook_dim`` to ``hidden_dim``. DALLE-pytorch
      has that conv only when ``num_resnet_blocks > 0`` (without resnet blocks its first transposed conv reads the
      codebook vectors directly); ``False`` reproduces that layout and needs ``num_resnet_blocks == 0``.
    """

    image_size: int = 32
    num_layers: int = 2
    num_tokens: int = 128
    codebook_dim: int = 64
    hidden_dim: int = 64
    channels: int = 3
    num_resnet_blocks: int = 1
    temperature: float = 0.9
    straight_through: bool = False
    reinmax: bool = False
    kl_div_loss_weight: float = 0.0
    smooth_l1_loss: bool = False
    normalization: Normalization | None = None
    decoder_input_conv: bool = True

    def __post_init__(self) -> None:
        _check_int("image_size", self.image_size, 1)
        _check_int("num_layers", self.num_layers, 1)
        _check_int("num_tokens", self.num_tokens, 2)
        _check_int("codebook_dim", self.codebook_dim, 1)
        _check_int("hidden_dim", self.hidden_dim, 1)
        _check_int("channels", self.channels, 1)
        _check_int("num_resnet_blocks", self.num_resnet_blocks, 0)
        _check_float("temperature", self.temperature, positive=True)
        _check_float("kl_div_loss_weight", self.kl_div_loss_weight, positive=False)
        _check_bool("straight_through", self.straight_through)
        _check_bool("smooth_l1_loss", self.smooth_l1_loss)
        _check_bool("reinmax", self.reinmax)
        _check_bool("decoder_input_conv", self.decoder_input_conv)
        if self.reinmax and not self.straight_through:
            raise ConfigError("reinmax needs straight_through=true (it refines the straight-through gradient)")
        if not self.decoder_input_conv and self.num_resnet_blocks > 0:
            raise ConfigError(
                f"decoder_input_conv=false needs num_resnet_blocks=0 (resnet blocks work on hidden_dim channels), "
                f"got num_resnet_blocks={self.num_resnet_blocks}"
            )
        factor = 2**self.num_layers
        if self.image_size % factor != 0:
            raise ConfigError(
                f"image_size must be divisible by 2**num_layers={factor}, got {self.image_size}",
            )
        object.__setattr__(self, "normalization", _normalization(self.normalization, self.channels))

    @property
    def fmap_size(self) -> int:
        """Side of the token grid: ``image_size // 2**num_layers``."""
        return self.image_size // 2**self.num_layers

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiscreteVAEConfig:
        """Build and validate a config from a plain dict; unknown or mistyped fields raise ConfigError."""
        return from_dict(cls, data)
