"""The training loss: cross-entropy of logits against target ids, in float32 at least.

On the CPU, PyTorch's ``F.cross_entropy`` is a log-softmax and a gather, and their backward a scatter and a
log-softmax backward: six passes over a tensor the size of the logits (a text vocabulary of 10,000 at every text
position makes that the largest activation of a small model), with log-probabilities of that size kept between.
Where :mod:`dalle_transformer.native` is built, the forward is one pass that also writes the gradient
(``softmax - one_hot``, kept instead of the log-probabilities) and the backward scales it. Same values up to float
rounding; ``torch.compile`` traces ``F.cross_entropy``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from dalle_transformer import native


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32 where they are narrower (a loss in bfloat16 loses the small probabilities)."""
    return logits.float() if logits.dtype.itemsize < 4 else logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``F.cross_entropy`` of ``logits`` ``[..., vocab]`` (upcast) against ``targets`` ``int64[...]``: the mean over
    all positions."""
    flat, flat_targets = upcast(logits).flatten(0, -2), targets.flatten()
    library = native.library_for(flat)
    if library is not None and native.cross_entropy_takes(flat, flat_targets):
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format) if needs_grad else None
        losses = native.cross_entropy(library, flat, flat_targets, grad)
        if losses is not None:
            if grad is None:
                return losses.mean()
            return cast(torch.Tensor, _MeanWithGradient.apply(flat, losses, grad))
    return F.cross_entropy(flat, flat_targets)


class _MeanWithGradient(torch.autograd.Function):
    """The mean of ``losses`` as a function of ``logits``, given each loss's gradient for its row of them."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_mean: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return grad * (grad_mean / grad.shape[0]), None, None
