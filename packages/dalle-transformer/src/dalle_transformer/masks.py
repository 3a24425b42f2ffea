"""The one definition of each attention pattern: may the query at position ``q`` attend to the key at ``k``?

Positions are those of the transformer input ``[BOS, text_1..text_T, image_1..image_{N-1}]``. The first
``text_len = T + 1`` positions (BOS and text) are the *text part*: their queries always get causal full attention.
Image position ``text_len + j`` holds image token ``j`` (0-based), at grid cell ``(row, col) = divmod(j, fmap)``.
Every image query may attend to the whole text part; its image keys depend on the type (all rules are causal):

- ``full``: every earlier image token.
- ``axial_row``: the same row, columns ``<= col``.
- ``axial_col``: the same column, rows ``<= row``.
- ``conv_like``: the top-left ``kernel x kernel`` window ending at the query, with dilation ``d``: cells
  ``(row - a*d, col - b*d)`` for ``a, b`` in ``0..kernel-1`` (DALLE-pytorch's causal ``F.unfold`` window).
- ``sparse``: block-sparse over image tokens in raster order, blocks of ``block_size`` tokens. Query block ``qb`` sees
  key block ``kb <= qb`` when ``qb - kb < local_blocks`` (a sliding window of blocks, causal inside the query's own
  block) or, with ``stride > 0``, when ``(qb - kb) % stride == 0`` (every ``stride``-th block further back, the
  Sparse Transformer's strided pattern at block granularity). DALLE-pytorch's ``sparse`` used DeepSpeed's random
  blocks; this one is deterministic so that it can be cached, compared and counted.

:meth:`AttentionPattern.allowed` is written with tensor arithmetic only, so the same function serves the dense masked
reference, the efficient paths' index tables, the KV-cached decode step and FlexAttention's ``mask_mod``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar, cast

import torch

from dalle_transformer.config import DALLEConfig

P = ParamSpec("P")
T = TypeVar("T")


def cached_table(build: Callable[P, T]) -> Callable[P, T]:
    """``functools.lru_cache(maxsize=64)`` for tables derived from patterns (index tables, masks), built outside
    ``torch.inference_mode``: a table first needed while generating is reused in training, where autograd refuses
    inference tensors. Looked up outside ``torch.compile``'s graphs: traced into, the lookup would rebuild the table
    in the graph, and the builders' host-side checks broke the graph with a warning."""

    @torch.compiler.disable
    @functools.lru_cache(maxsize=64)
    @functools.wraps(build)
    def cached(*args: P.args, **kwargs: P.kwargs) -> T:
        with torch.inference_mode(False):
            return build(*args, **kwargs)

    return cast(Callable[P, T], cached)


@dataclass(frozen=True)
class AttentionPattern:
    """One layer's attention pattern over a sequence laid out as ``text_len`` text positions then an image grid."""

    kind: str
    text_len: int
    fmap_size: int
    kernel_size: int = 5
    dilation: int = 1
    block_size: int = 16
    local_blocks: int = 4
    stride: int = 4

    @property
    def max_len(self) -> int:
        """Longest input: the text part and every image token but the last (which is only a target)."""
        return self.text_len + self.fmap_size**2 - 1

    def allowed(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Boolean tensor (broadcast of ``q`` and ``k``): True where query position ``q`` may attend to key ``k``."""
        causal = k <= q
        if self.kind == "full":
            return causal
        text_query = q < self.text_len
        text_key = k < self.text_len
        qi, ki = q - self.text_len, k - self.text_len  # image indices (negative in the text part, masked anyway)
        f = self.fmap_size
        if self.kind == "axial_row":
            image = (qi // f) == (ki // f)
        elif self.kind == "axial_col":
            image = (qi % f) == (ki % f)
        elif self.kind == "conv_like":
            reach = (self.kernel_size - 1) * self.dilation
            dr, dc = qi // f - ki // f, qi % f - ki % f
            d = self.dilation
            image = (dr >= 0) & (dc >= 0) & (dr <= reach) & (dc <= reach) & (dr % d == 0) & (dc % d == 0)
        elif self.kind == "sparse":
            back = qi // self.block_size - ki // self.block_size
            image = back < self.local_blocks
            if self.stride > 0:
                image = image | (back % self.stride == 0)
        else:
            raise ValueError(f"unknown attention type {self.kind!r}")
        return causal & (text_query | text_key | image)

    def dense_mask(self, query_positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """``bool[len(query_positions), key_len]``: the mask rows of the given query positions."""
        keys = torch.arange(key_len, device=query_positions.device)
        return self.allowed(query_positions[:, None], keys[None, :])

    def square_mask(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``bool[length, length]`` mask of the first ``length`` positions."""
        return self.dense_mask(torch.arange(length, device=device), length)


def layer_patterns(config: DALLEConfig) -> tuple[AttentionPattern, ...]:
    """The attention pattern of each layer (``attn_types`` cycled over ``depth``)."""
    return tuple(
        AttentionPattern(
            kind=kind,
            text_len=config.text_seq_len + 1,
            fmap_size=config.image_fmap_size,
            kernel_size=config.conv_kernel_size,
            dilation=config.conv_dilation,
            block_size=config.sparse_block_size,
            local_blocks=config.sparse_local_blocks,
            stride=config.sparse_stride,
        )
        for kind in config.layer_attn_types()
    )
