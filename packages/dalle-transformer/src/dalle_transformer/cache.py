"""A static inference cache for incremental decoding: allocated once for the whole sequence.

It holds every layer's (rotated) keys and values, and, for token shifting, the shifted channels of each branch's
normalised input (a token's shift reads its left and top neighbours, so those must be kept too). Which keys a new
query reads is the layer's attention pattern's business (:func:`dalle_transformer.plans.decode_keys`): the cache
stores positions, the pattern decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dalle_core.errors import ShapeError

if TYPE_CHECKING:
    from dalle_transformer.decoding_weights import DecodingWeights, Projection


class KVCache:
    """Keys and values of every layer, preallocated: ``keys[layer]`` and ``values[layer]`` are
    ``[batch, heads, max_len, dim_head]``.

    ``length`` counts the positions already written. During one forward pass each attention layer calls
    :meth:`write` (which stores at ``length`` and returns the keys/values up to the new end), and the model calls
    :meth:`advance` once after the last layer, so every layer of that pass sees the same start. With
    ``shift_width > 0`` it also keeps shift inputs, ``shift_inputs[layer][branch]``: ``[batch, max_len + 1,
    shift_width]`` (row 0 stays zero: what a token past the sequence's start reads).

    Each layer's buffers are separate tensors, not slices of one: ``torch.compile`` writes into a whole input tensor
    in place, where a write into a slice of one makes it copy the tensor on every step.

    ``layer_weights[layer]`` holds the tensors that layer's decoding steps read
    (:class:`dalle_transformer.decoding_weights.DecodingWeights`, with copies of its projections in the layout few-row
    products are fastest with), gathered by the model when a pass starts on the empty cache: for the sequence being
    decoded, not beyond it.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        heads: int,
        max_len: int,
        dim_head: int,
        *,
        shift_width: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.keys = [zeros(batch_size, heads, max_len, dim_head) for _ in range(num_layers)]
        self.values = [zeros(batch_size, heads, max_len, dim_head) for _ in range(num_layers)]
        self.shift_inputs = (
            [[zeros(batch_size, max_len + 1, shift_width) for _branch in range(2)] for _layer in range(num_layers)]
            if shift_width > 0
            else None
        )
        self.layer_weights: list[DecodingWeights] | None = None
        self.image_head: Projection | None = None  # the image logits' projection, gathered with layer_weights
        self.batch_size, self.max_len, self.device = batch_size, max_len, self.keys[0].device
        self.length = 0

    def _end(self, n: int) -> int:
        end = self.length + n
        if end > self.max_len:
            raise ShapeError(f"KV cache holds at most {self.max_len} positions, asked to write up to position {end}")
        return end

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values`` (``[batch, heads, n, dim_head]``) of ``layer`` at positions ``length..length+n``.

        Returns views of that layer's keys and values over positions ``0..length+n``.
        """
        n = keys.shape[-2]
        end = self._end(n)
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        # narrow + copy_: a decoding step writes every layer, and slice assignment costs half as much again.
        layer_keys.narrow(2, self.length, n).copy_(keys)
        layer_values.narrow(2, self.length, n).copy_(values)
        return layer_keys.narrow(2, 0, end), layer_values.narrow(2, 0, end)

    def write_shift_input(self, layer: int, branch: int, x: torch.Tensor) -> torch.Tensor:
        """Store the shifted channels of ``x`` (``[batch, n, >= shift_width]``) for ``layer``'s ``branch`` (0:
        attention, 1: feed-forward); return that history, ``[batch, length + n + 1, shift_width]`` (zero row first)."""
        if self.shift_inputs is None:
            raise ShapeError("this KV cache was made without room for token shifting (shift_width=0)")
        end = self._end(x.shape[1])
        history = self.shift_inputs[layer][branch]
        history[:, self.length + 1 : end + 1] = x[..., : history.shape[-1]]
        return history[:, : end + 1]

    def write_at(
        self, layer: int, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's ``keys``/``values`` (``[batch, heads, 1, dim_head]``) of ``layer`` at ``position``
        (``int64[1]`` on the cache's device); return that layer's whole buffers, ``[batch, heads, max_len, dim_head]``.

        No host-side index or check: a decode step made of these calls can be compiled once for every position and
        captured in a CUDA graph. Positions not yet written hold zeros or stale values; the caller's mask must
        exclude them.
        """
        self.keys[layer].index_copy_(2, position, keys)
        self.values[layer].index_copy_(2, position, values)
        return self.keys[layer], self.values[layer]

    def write_shift_input_at(self, layer: int, branch: int, position: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`write_shift_input` for one position given as ``int64[1]``; returns the whole history,
        ``[batch, max_len + 1, shift_width]``."""
        if self.shift_inputs is None:
            raise ShapeError("this KV cache was made without room for token shifting (shift_width=0)")
        history = self.shift_inputs[layer][branch]
        history.index_copy_(1, position + 1, x[..., : history.shape[-1]])
        return history

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as written (called once per forward pass, after every layer wrote)."""
        self.length += n

    def reset(self) -> None:
        """Forget every position and the layers' decoding tensors; the buffers are reused as they are."""
        self.length = 0
        self.layer_weights, self.image_head = None, None
