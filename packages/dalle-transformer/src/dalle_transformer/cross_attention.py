"""Attention whose keys come from a separate memory, under a boolean mask: the encoder-decoder's building blocks.

:class:`MemoryAttention` serves both the text encoder's bidirectional self-attention (memory = the layer's own input,
mask = which text keys each query may read) and the decoder's cross-attention (memory = the encoder output). Its keys
and values are projected by :meth:`MemoryAttention.project_memory`, so that generation projects the encoder output
once per prompt and reuses it for every image token. :class:`ResidualBranch` wraps any function as
``scale * out_norm(fn(norm(x)))``, the same branch shape as :class:`dalle_transformer.layers.Block`'s.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dalle_transformer.config import DALLEConfig
from dalle_transformer.layers import layer_scale_init, layer_scaled
from dalle_transformer.linear import Linear


class MemoryAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        inner = heads * dim_head
        self.to_q = Linear(dim, inner, bias=False)
        self.to_kv = Linear(dim, 2 * inner, bias=False)
        self.to_out = Linear(inner, dim)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, M, D]`` of ``memory`` ``[B, M, dim]``."""
        batch, m, _ = memory.shape
        k, v = self.to_kv(memory).view(batch, m, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``x`` ``[B, n, dim]`` attends to ``keys``/``values``; ``mask``: bool, broadcast to ``[B, H, n, M]``."""
        batch, n, _ = x.shape
        q = self.to_q(x).view(batch, n, self.heads, self.dim_head).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)
        return self.to_out(out.transpose(1, 2).reshape(batch, n, self.heads * self.dim_head))


class ResidualBranch(nn.Module):
    """``scale * out_norm(fn(norm(x)))``: ``out_norm`` only with ``sandwich_norm``, ``scale`` only with
    ``layer_scale`` (initialised for layer ``index``, as the decoder-only blocks are)."""

    def __init__(self, config: DALLEConfig, index: int) -> None:
        super().__init__()
        dim = config.dim
        self.norm = nn.LayerNorm(dim)
        self.out_norm = nn.LayerNorm(dim) if config.sandwich_norm else None
        self.scale = nn.Parameter(torch.full((dim,), layer_scale_init(index + 1))) if config.layer_scale else None

    def forward(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        h = fn(self.norm(x))
        if self.out_norm is not None:
            h = self.out_norm(h)
        return layer_scaled(h, self.scale) if self.scale is not None else h
