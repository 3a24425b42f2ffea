"""The training loss: cross-entropy of logits against target ids, in float32 at least.

On the CPU, PyTorch's ``F.cross_entropy`` is a log-softmax and a gather, and their backward a scatter and a
log-softmax backward: six passes over a tensor the size of the logits (a text vocabulary of 10,000 at every text
position makes that the largest activation of a small model), with log-probabilities of that size kept between.
Where :mod:`dalle_transformer.native` is built, the forward is one pass that also writes the gradient
(``softmax - one_hot``, kept instead of the log-probabilities), already scaled by the gradient the mean is expected
to receive (its weight in the training loss), so that the backward passes it on without another pass over the
logits' size. Same values up to float rounding; ``torch.compile`` calls the kernel as an operator in training, and
traces ``F.cross_entropy`` elsewhere.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F

from dalle_core.errors import ShapeError
from dalle_transformer import native


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` in float32 where they are narrower (a loss in bfloat16 loses the small probabilities)."""
    return logits.float() if logits.dtype.itemsize < 4 else logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, gradient_weight: float = 1.0) -> torch.Tensor:
    """``F.cross_entropy`` of ``logits`` ``[..., vocab]`` (upcast) against ``targets`` ``int64[...]``: the mean over
    all positions.

    ``gradient_weight``: the gradient the mean is expected to receive in backward (its weight in the loss that is
    differentiated). The native kernel writes the logits' gradient already scaled by it, and a backward receiving
    exactly that passes the gradient on as it is; any other gradient is still exact, for one more pass over the
    logits' size. The value returned does not depend on it."""
    flat, flat_targets = upcast(logits).flatten(0, -2), targets.flatten()
    if torch.compiler.is_compiling():
        return _compiled_cross_entropy(flat, flat_targets)
    library = native.library_for(flat)
    if library is not None and native.cross_entropy_takes(flat, flat_targets):
        needs_grad = torch.is_grad_enabled() and flat.requires_grad
        grad = torch.empty_like(flat, memory_format=torch.contiguous_format) if needs_grad else None
        # The gradient of the mean for a received gradient g is g / rows * (softmax - one_hot): written for g equal
        # to the weight (as float32, the dtype g arrives in; for a weight of 0, as for 1, so that it can be rescaled).
        scale = _float32(gradient_weight) or 1.0
        losses = native.cross_entropy(library, flat, flat_targets, grad, scale / flat.shape[0])
        if losses is not None:
            if grad is None:
                return losses.mean()
            return cast(torch.Tensor, _MeanWithGradient.apply(flat, losses, grad, scale))
    return F.cross_entropy(flat, flat_targets)


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


class _MeanWithGradient(torch.autograd.Function):
    """The mean of ``losses`` as a function of ``logits``, given the logits' gradient of the mean for a received
    gradient of ``weight``."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor, weight: float
    ) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.weight = weight
        return losses.mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_mean: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        received = float(grad_mean)
        if received == ctx.weight:
            return grad, None, None, None
        return grad * (received / ctx.weight), None, None, None


def _compiled_cross_entropy(flat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`cross_entropy` under ``torch.compile``: in training, the kernel as an operator that it keeps whole
    (inductor's log-softmax and its backward make more passes over the logits). A target outside the vocabulary
    raises ``IndexError`` there, ``F.cross_entropy``'s ignore index included (the model's targets never are)."""
    needs_grad = torch.is_grad_enabled() and flat.requires_grad
    if needs_grad and native.cross_entropy_fits(flat, targets) and _kernels_built():
        return _cross_entropy_with_gradient(flat, targets)[0].mean()
    return F.cross_entropy(flat, targets)


@torch.compiler.assume_constant_result
def _kernels_built() -> bool:
    """Whether the native library is built here: a fact of the process, which ``torch.compile`` reads once instead
    of tracing the library's loading."""
    return native.available()


@torch.library.custom_op("dalle_transformer::cross_entropy_with_gradient", mutates_args=())
def _cross_entropy_with_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's loss and its gradient for the row (``native.cross_entropy``)."""
    logits, targets = logits if logits.stride(1) == 1 else logits.contiguous(), targets.contiguous()
    if not native.cross_entropy_takes(logits, targets):  # (the operator can be called directly)
        raise ShapeError(f"cross_entropy: expected float32 CPU logits [rows, vocab] and int64 targets [rows], got "
                         f"{logits.dtype} {list(logits.shape)} and {targets.dtype} {list(targets.shape)}")  # fmt: skip
    grad = torch.empty(logits.shape)
    losses = native.cross_entropy(native.required_library(), logits, targets, grad)
    if losses is None:
        outside = targets[(targets < 0) | (targets >= logits.shape[1])]
        raise IndexError(f"cross_entropy: expected targets in [0, {logits.shape[1]}), got {outside[0].item()}")
    return losses, grad


@_cross_entropy_with_gradient.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape)


def _keep_gradient(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
    ctx.save_for_backward(output[1])


def _scaled_gradient(ctx: Any, grad_losses: torch.Tensor, _: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
    (grad,) = ctx.saved_tensors
    return grad * grad_losses[:, None], None


_cross_entropy_with_gradient.register_autograd(_scaled_gradient, setup_context=_keep_gradient)
