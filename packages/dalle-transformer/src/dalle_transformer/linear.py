"""Linear layers that stay fast when a few rows go through them, as in KV-cached decoding.

For ``x`` of a few rows, ``F.linear`` (``x @ W^T``) makes the CPU BLAS repack the whole weight matrix on every
call; computing ``(W @ x^T)^T`` instead streams the weight once in its stored row-major order. On the 2-core AVX2
machine of docs/benchmarks.md that is 2.0-3.2x faster at 4 rows, 1.3-1.6x at 8 to 16 and 1.2x at 64, and the same
at 1 row or hundreds. The result is the same product, summed in another order (float rounding only).

That product is fast while the few rows of ``x`` are small next to the CPU's caches: on the same machine MKL streams
a weight at 40-50 GB/s while ``rows x in_features`` stays at or below 4096 floats, and at 13-18 GB/s above (an
``[out, 2048]`` weight at 4 rows, the feed-forward's output projection of a 512-wide model). :func:`column_blocks`
copies such a weight into contiguous blocks of its input columns, each product of a block being under that size,
and :func:`linear` sums the blocks' products: 2.3-2.5x faster for those weights at 4 rows, 1.5-1.8x at 6 to 8
(docs/benchmarks.md). Decoding makes these copies when a pass starts on an empty KV cache, for that sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the weight-streaming form is used (it was still 1.2x faster at 64 rows; large training
# batches go through F.linear, whose kernels are already near the machine's matrix-multiply peak).
STREAMING_MAX_ROWS = 64
# Column blocks: up to 4 rows, blocks of 1024 input columns; 5 to 8 rows, 512; above 8 rows the products are no
# faster in blocks. Only weights of more than 1024 input columns are copied: in models up to 1024 wide (and heads x
# dim_head up to 1024) the feed-forward's output projections alone, a third of the layers' weights.
BLOCKED_MAX_ROWS = 8
BLOCKED_MIN_COLUMNS = 1025


def column_blocks(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A copy of ``weight`` (``[out, in]``) as contiguous blocks of its input columns, ``[in // size, out, size]``,
    for products with ``rows`` rows on the CPU; None where :func:`linear` is as fast on the weight itself."""
    out_features, in_features = weight.shape
    size = 1024 if rows <= 4 else 512
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not 2 <= rows <= BLOCKED_MAX_ROWS
        or in_features < BLOCKED_MIN_COLUMNS
        or in_features % size
    ):
        return None
    return weight.detach().view(out_features, in_features // size, size).transpose(0, 1).contiguous()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, blocks: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on the CPU, without autograd, with 2 to 64 rows: ``(W @ x^T)^T + b``, summed
    over ``blocks`` (``weight``'s :func:`column_blocks`, the same values) when given."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        2 <= rows <= STREAMING_MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        flat = x.reshape(rows, x.shape[-1]).T
        if blocks is not None:
            out = _blocked_product(blocks, flat, bias)
        else:
            out = weight @ flat if bias is None else torch.addmm(bias[:, None], weight, flat)
        # Copied back to contiguous rows (a few rows: cheap): elementwise ops, residual adds and SDPA's fused CPU
        # kernel are slower on the transposed view, more than the next projection gains from it.
        return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _blocked_product(blocks: torch.Tensor, flat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    size = blocks.shape[-1]
    out = blocks[0] @ flat[:size] if bias is None else torch.addmm(bias[:, None], blocks[0], flat[:size])
    for i in range(1, blocks.shape[0]):
        out.addmm_(blocks[i], flat[i * size : (i + 1) * size])
    return out


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
