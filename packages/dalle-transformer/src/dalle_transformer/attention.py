"""Multi-head self-attention whose pattern (full, axial, conv-like, sparse) is given per call.

The module only holds the projections, so layers that share weights (``shared_attn_ids``) may still differ in
pattern. Which computation runs is chosen per pass: without a cache (or when filling an empty one) the whole
sequence goes through the backend (``dense`` reference, ``efficient``, ``flex`` or ``auto``); after that, one new
query at a time attends to the keys its mask row allows, gathered from the cache.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from dalle_transformer.cache import KVCache
from dalle_transformer.decoding_weights import project
from dalle_transformer.kernels import (
    attend_causal,
    attend_decode,
    attend_decode_at,
    attend_dense,
    attend_efficient,
    attend_flex,
    attend_grouped,
    attend_rows,
    flex_available,
)
from dalle_transformer.linear import Linear
from dalle_transformer.masks import AttentionPattern
from dalle_transformer.rotary import rotate
from dalle_transformer.shift import TokenShift

ATTENTION_BACKENDS = ("auto", "dense", "efficient", "flex")


@dataclass
class PassContext:
    """What every layer of one forward pass over positions ``start..start+n`` shares."""

    start: int = 0
    cache: KVCache | None = None
    backend: str = "auto"
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of positions start..start+n
    shift: TokenShift | None = None
    stable: bool = False
    # One new position after a filled cache, without autograd (a decoding step): layers take their few-op path.
    single: bool = False
    # A decoding step whose position is this int64[1] device tensor rather than ``start``: every index is computed
    # on the device and attention reads the whole cache under a mask row, so the step can be captured in a CUDA graph.
    position: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        inner = heads * dim_head
        self.to_qkv = Linear(dim, 3 * inner, bias=False)
        self.to_out = Linear(inner, dim)

    def forward(
        self, x: torch.Tensor, pattern: AttentionPattern, context: PassContext, layer_index: int
    ) -> torch.Tensor:
        if context.single:
            return self.one_position(x, pattern, context, layer_index)
        batch, n, _ = x.shape
        qkv = self.to_qkv(x).view(batch, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if context.rotary is not None:
            qkv = rotate(qkv, *context.rotary)
        dropout_p = self.dropout if self.training else 0.0
        cache = context.cache
        if cache is not None:
            keys, values = cache.write(layer_index, qkv[1], qkv[2])
        if cache is None or context.start == 0:
            out = self._whole_sequence(qkv, pattern, context, dropout_p)
        elif n == 1:
            out = attend_decode(qkv[0], keys, values, pattern, context.start, context.backend)
        else:
            out = attend_rows(qkv[0], keys, values, pattern, context.start, dropout_p)
        return self.to_out(out.transpose(1, 2).reshape(batch, n, self.heads * self.dim_head))

    def one_position(
        self, x: torch.Tensor, pattern: AttentionPattern, context: PassContext, layer_index: int
    ) -> torch.Tensor:
        """``forward`` for one position (``x``: ``[B, dim]`` or ``[B, 1, dim]``) written after the cache's
        ``context.start`` ones: the same products (with the tensors of the cache's ``layer_weights``), the heads as
        views of one projection, no per-call checks."""
        batch = x.shape[0]
        cache, position = context.cache, context.position
        assert cache is not None and cache.layer_weights is not None  # made for single passes
        weights = cache.layer_weights[layer_index]
        qkv = project(weights.qkv, x.reshape(batch, -1)).view(batch, 3, self.heads, 1, self.dim_head)
        if context.rotary is not None:
            qkv = rotate(qkv, *context.rotary)
        q, k, v = qkv.unbind(1)  # each [B, heads, 1, dim_head]
        if position is None:
            keys, values = cache.write(layer_index, k, v)
            out = attend_decode(q, keys, values, pattern, context.start, context.backend)
        else:
            keys, values = cache.write_at(layer_index, position, k, v)
            out = attend_decode_at(q, keys, values, pattern, position, context.backend)
        return project(weights.out, out.reshape(batch, -1)).view(*x.shape[:-1], -1)

    @staticmethod
    def _whole_sequence(
        qkv: torch.Tensor, pattern: AttentionPattern, context: PassContext, dropout_p: float
    ) -> torch.Tensor:
        backend = context.backend
        # Text queries attend causally in every pattern: a text-only pass is full attention too.
        causal = pattern.kind == "full" or qkv.shape[3] <= pattern.text_len
        if backend == "auto" and dropout_p < 1.0:
            out = attend_causal(qkv, dropout_p) if causal else attend_grouped(qkv, pattern, dropout_p)
            if out is not None:
                return out
        q, k, v = qkv.unbind(0)
        if backend == "dense":
            return attend_dense(q, k, v, pattern, dropout_p)
        # FlexAttention has no dropout, and no backward on CPU: there the efficient path runs instead.
        use_flex = backend == "flex" or (backend == "auto" and q.is_cuda and pattern.kind != "full" and _flex_works[0])
        if use_flex and dropout_p == 0.0 and (q.is_cuda or not q.requires_grad) and flex_available():
            if backend == "flex":
                return attend_flex(q, k, v, pattern)
            try:
                return attend_flex(q, k, v, pattern)
            except Exception as error:  # any compile failure: auto falls back, once, loudly
                _flex_works[0] = False
                first_line = str(error).splitlines()[0] if str(error) else ""
                warnings.warn(
                    f"FlexAttention failed ({type(error).__name__}: {first_line}); "
                    "the auto attention backend uses the efficient path from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return attend_efficient(q, k, v, pattern, dropout_p, context.stable)


def is_decoding_step(cache: KVCache | None, n: int, training: bool) -> bool:
    """Whether a pass over ``n`` positions is one step of incremental decoding (``PassContext.single``): one new
    position after a filled cache, in eval mode, without autograd."""
    return cache is not None and cache.length > 0 and n == 1 and not (training or torch.is_grad_enabled())


# Whether the auto backend may still try FlexAttention in this process (a failed torch.compile turns it off).
_flex_works = [True]
