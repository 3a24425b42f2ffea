"""A static key/value cache for incremental decoding: allocated once for the whole sequence."""

from __future__ import annotations

import torch

from dalle_core.errors import ShapeError


class KVCache:
    """Keys and values of every layer, preallocated as ``[layers, batch, heads, max_len, dim_head]``.

    ``length`` counts the positions already written. During one forward pass each attention layer calls
    :meth:`write` (which stores at ``length`` and returns the keys/values up to the new end), and the model calls
    :meth:`advance` once after the last layer, so every layer of that pass sees the same start.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        heads: int,
        max_len: int,
        dim_head: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_layers, batch_size, heads, max_len, dim_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` (``[batch, heads, n, dim_head]``) of ``layer`` at positions ``length..length+n``.

        Returns views of that layer's keys and values over positions ``0..length+n``.
        """
        end = self.length + keys.shape[-2]
        if end > self.max_len:
            raise ShapeError(f"KV cache holds at most {self.max_len} positions, asked to write up to position {end}")
        self.keys[layer, :, :, self.length : end] = keys
        self.values[layer, :, :, self.length : end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written (called once per forward pass, after every layer wrote)."""
        self.length += n

    def reset(self) -> None:
        """Forget every position; the buffers are reused as they are."""
        self.length = 0
