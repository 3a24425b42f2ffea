"""The transformer's hyper-parameters: a frozen dataclass validated on construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from dalle_core.config import from_dict, to_dict
from dalle_core.errors import ConfigError

AttentionType = Literal["full", "axial_row", "axial_col", "conv_like", "sparse"]
Architecture = Literal["decoder_only", "encoder_decoder"]
ARCHITECTURES: tuple[str, ...] = ("decoder_only", "encoder_decoder")
# Options whose meaning is tied to the decoder-only ``[BOS, text, image]`` sequence; rejected with encoder_decoder.
DECODER_ONLY_OPTIONS: tuple[str, ...] = (
    "reversible",
    "rotary_emb",
    "shift_tokens",
    "share_input_output_emb",
    "shared_attn_ids",
    "shared_ff_ids",
)
ATTENTION_TYPES: tuple[str, ...] = ("full", "axial_row", "axial_col", "conv_like", "sparse")


@dataclass(frozen=True)
class DALLEConfig:
    """Sizes and options of a DALLE transformer over ``[BOS, text ids, image ids]``.

    ``num_text_tokens`` is exactly the text tokenizer's ``vocab_size``; the model adds ``text_seq_len`` per-position
    padding tokens on top of it. ``image_fmap_size`` is the side of the image tokenizer's feature map, so an image is
    ``image_fmap_size ** 2`` tokens drawn from ``num_image_tokens`` codes.

    The options after ``loss_img_weight`` follow DALLE-pytorch 1.6.6's meaning; their defaults give the plain model
    (full attention, learned positions, pre-LayerNorm blocks, GELU feed-forward):

    - ``attn_types``: attention pattern per layer, cycled over ``depth`` (see :mod:`dalle_transformer.masks`):
      ``full``, ``axial_row``, ``axial_col``, ``conv_like`` (``conv_kernel_size``, ``conv_dilation``) and ``sparse``
      (``sparse_block_size``, ``sparse_local_blocks``, ``sparse_stride``).
    - ``reversible``: RevNet coupling of attention and feed-forward (activations recomputed in backward);
      ``gradient_checkpointing``: recompute each layer in backward. At most one of the two.
    - ``rotary_emb``: rotary embeddings (1D text + 2D axial image) on queries, keys and values instead of learned
      positions; ``shift_tokens``: token shifting (text from the previous position, image from top and left).
    - ``sandwich_norm``: a LayerNorm after each branch too; ``layer_scale``: per-channel branch scales (CaiT, as
      DALLE-pytorch's ``LayerScale``); ``stable``: DALLE-pytorch's ``stable`` (embedding gradient scaled by 0.1,
      max-normalised output before the final norm, max-subtracted softmax).
    - ``shared_attn_ids`` / ``shared_ff_ids``: layers with the same id (cycled over depth) share weights.
    - ``share_input_output_emb``: text and image embeddings are rows of ``to_logits``.
    - ``null_cond_prob``: in training, each text is replaced by the null condition (all padding) with this
      probability, which is what classifier-free guidance (``cond_scale``) needs.
    - ``ff_activation``: ``gelu`` (a GELU MLP) or ``geglu`` (DALLE-pytorch's gated feed-forward).
    - ``architecture``: ``decoder_only`` (the model above; the default, and what a checkpoint without the field
      means) or ``encoder_decoder`` (dalle-mini/BART style, :mod:`dalle_transformer.encoder_decoder`): a
      bidirectional text encoder of ``encoder_depth`` layers (default ``depth``) and a ``depth``-layer image decoder
      with cross-attention. It has no text loss; the options in ``DECODER_ONLY_OPTIONS`` are rejected with it.
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
    attn_types: tuple[AttentionType, ...] = ("full",)
    conv_kernel_size: int = 5
    conv_dilation: int = 1
    sparse_block_size: int = 16
    sparse_local_blocks: int = 4
    sparse_stride: int = 4
    reversible: bool = False
    gradient_checkpointing: bool = False
    rotary_emb: bool = False
    shift_tokens: bool = False
    sandwich_norm: bool = False
    stable: bool = False
    layer_scale: bool = False
    shared_attn_ids: tuple[int, ...] | None = None
    shared_ff_ids: tuple[int, ...] | None = None
    share_input_output_emb: bool = False
    null_cond_prob: float = 0.0
    ff_activation: Literal["gelu", "geglu"] = "gelu"
    architecture: Architecture = "decoder_only"
    encoder_depth: int | None = None

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
            "conv_dilation",
            "sparse_block_size",
            "sparse_local_blocks",
        ):
            _positive_int(name, getattr(self, name))
        self._check_options()
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

    def _check_options(self) -> None:
        # Lists (from hand-written configs) become tuples, so configs compare and hash as values.
        for name in ("attn_types", "shared_attn_ids", "shared_ff_ids"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        types = self.attn_types
        if not isinstance(types, tuple) or not types or any(kind not in ATTENTION_TYPES for kind in types):
            raise ConfigError(
                f"DALLEConfig.attn_types: expected a non-empty list of {list(ATTENTION_TYPES)}, got {types!r}"
            )
        kernel = self.conv_kernel_size
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"DALLEConfig.conv_kernel_size: expected an odd positive integer, got {kernel!r}")
        stride = self.sparse_stride
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ConfigError(
                f"DALLEConfig.sparse_stride: expected an integer >= 0 (0: no strided blocks), got {stride!r}"
            )
        for name in (
            "reversible",
            "gradient_checkpointing",
            "rotary_emb",
            "shift_tokens",
            "sandwich_norm",
            "stable",
            "layer_scale",
            "share_input_output_emb",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"DALLEConfig.{name}: expected true or false, got {getattr(self, name)!r}")
        if self.reversible and self.gradient_checkpointing:
            raise ConfigError(
                "DALLEConfig.gradient_checkpointing: reversible layers already recompute activations; "
                "set at most one of reversible and gradient_checkpointing"
            )
        if self.rotary_emb and self.dim_head < 6:
            raise ConfigError(
                f"DALLEConfig.dim_head: rotary_emb rotates three groups of dim_head // 3 features, so it needs "
                f"dim_head >= 6, got {self.dim_head}"
            )
        if self.shift_tokens and self.dim < 2:
            raise ConfigError(f"DALLEConfig.dim: shift_tokens needs dim >= 2, got {self.dim}")
        for name in ("shared_attn_ids", "shared_ff_ids"):
            ids = getattr(self, name)
            if ids is not None and (
                not isinstance(ids, tuple) or not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids)
            ):
                raise ConfigError(f"DALLEConfig.{name}: expected null or a non-empty list of integers, got {ids!r}")
        prob = self.null_cond_prob
        if not _is_number(prob) or not 0.0 <= prob <= 1.0:
            raise ConfigError(f"DALLEConfig.null_cond_prob: expected a probability in [0, 1], got {prob!r}")
        if self.ff_activation not in ("gelu", "geglu"):
            raise ConfigError(f"DALLEConfig.ff_activation: expected 'gelu' or 'geglu', got {self.ff_activation!r}")
        self._check_architecture()

    def _check_architecture(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"DALLEConfig.architecture: expected one of {list(ARCHITECTURES)}, got {self.architecture!r}"
            )
        if self.encoder_depth is not None:
            _positive_int("encoder_depth", self.encoder_depth)
        if self.architecture == "decoder_only":
            if self.encoder_depth is not None:
                raise ConfigError(
                    f"DALLEConfig.encoder_depth: only for architecture 'encoder_decoder', got {self.encoder_depth!r} "
                    "with 'decoder_only'"
                )
            return
        for name in DECODER_ONLY_OPTIONS:
            value = getattr(self, name)
            if value not in (False, None):
                raise ConfigError(
                    f"DALLEConfig.{name}: not supported with architecture 'encoder_decoder' (decoder-only option), "
                    f"got {value!r}"
                )

    @property
    def num_encoder_layers(self) -> int:
        """Encoder layers of an ``encoder_decoder`` model: ``encoder_depth``, or ``depth`` when not given."""
        return self.encoder_depth if self.encoder_depth is not None else self.depth

    def layer_attn_types(self) -> tuple[AttentionType, ...]:
        """The attention type of each of the ``depth`` layers: ``attn_types`` cycled."""
        return tuple(self.attn_types[i % len(self.attn_types)] for i in range(self.depth))

    def layer_share_ids(self, ids: tuple[int, ...] | None) -> tuple[int, ...]:
        """Sharing ids cycled over ``depth``; without ids every layer has its own (``0..depth-1``)."""
        if ids is None:
            return tuple(range(self.depth))
        return tuple(ids[i % len(ids)] for i in range(self.depth))

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
