"""Causal multi-head self-attention on ``scaled_dot_product_attention``, with a KV-cached incremental path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dalle_transformer.cache import KVCache


def causal_mask(query_len: int, key_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean ``[query_len, key_len]`` mask (True = may attend) for queries that are the last ``query_len`` keys."""
    offset = key_len - query_len
    rows = torch.arange(query_len, device=device)[:, None]
    cols = torch.arange(key_len, device=device)[None, :]
    return cols <= rows + offset


class CausalSelfAttention(nn.Module):
    """Full causal attention: position ``i`` attends to positions ``0..i``.

    Without a cache the whole sequence is attended with ``is_causal=True``. With a :class:`KVCache`, the new
    positions' keys and values are written at ``cache.length`` (layer ``layer_index``) and the queries attend to
    every cached position up to and including their own.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.dropout = dropout
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_index: int = 0) -> torch.Tensor:
        batch, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(batch, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None or cache.length == 0:
            if cache is not None:
                cache.write(layer_index, k, v)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            keys, values = cache.write(layer_index, k, v)
            # One new query sees every cached position: no mask needed. Several new queries need a shifted causal mask.
            mask = None if n == 1 else causal_mask(n, keys.shape[-2], device=x.device)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)
        return self.to_out(out.transpose(1, 2).reshape(batch, n, self.heads * self.dim_head))
