"""Linear layers that stay fast when a few rows go through them, as in KV-cached decoding.

For ``x`` of a few rows, ``F.linear`` (``x @ W^T``) makes the CPU BLAS repack the whole weight matrix on every
call; computing ``(W @ x^T)^T`` instead streams the weight once in its stored row-major order. On the 2-core AVX2
machine of docs/benchmarks.md that is 2.0-3.2x faster at 4 rows, 1.3-1.6x at 8 to 16 and 1.2x at 64, and the same
at 1 row or hundreds. The result is the same product, summed in another order (float rounding only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the weight-streaming form is used (it was still 1.2x faster at 64 rows; large training
# batches go through F.linear, whose kernels are already near the machine's matrix-multiply peak).
STREAMING_MAX_ROWS = 64


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; on the CPU, without autograd, with 2 to 64 rows: ``(W @ x^T)^T + b``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        2 <= rows <= STREAMING_MAX_ROWS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        flat = x.reshape(rows, x.shape[-1]).T
        out = weight @ flat if bias is None else torch.addmm(bias[:, None], weight, flat)
        # Copied back to contiguous rows (a few rows: cheap): elementwise ops, residual adds and SDPA's fused CPU
        # kernel are slower on the transposed view, more than the next projection gains from it.
        return out.T.contiguous().reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
