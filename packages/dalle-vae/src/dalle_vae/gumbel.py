"""Gumbel-softmax sampling with an optional generator and an exact straight-through one-hot."""

from __future__ import annotations

import torch


def gumbel_sample(
    logits: torch.Tensor,
    temperature: float,
    hard: bool = False,
    generator: torch.Generator | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """A relaxed one-hot sample ``softmax((logits + g) / temperature)`` along ``dim``, ``g`` ~ Gumbel(0, 1).

    With ``hard`` the forward value is the exact one-hot of the sample's argmax (every entry exactly 0.0 or 1.0) while
    gradients flow through the soft sample (straight-through estimator). ``generator`` makes the noise reproducible.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # -log(E) with E ~ Exponential(1) is Gumbel(0, 1) distributed; E > 0 almost surely.
    noise = torch.empty_like(logits).exponential_(generator=generator).log().neg()
    soft = ((logits + noise) / temperature).softmax(dim=dim)
    if not hard:
        return soft
    index = soft.argmax(dim=dim, keepdim=True)
    one_hot = torch.zeros_like(soft).scatter_(dim, index, 1.0)
    # (soft - soft.detach()) is exactly zero in the forward pass, so the value is exactly one_hot.
    return one_hot + (soft - soft.detach())


def reinmax_sample(
    logits: torch.Tensor,
    temperature: float,
    generator: torch.Generator | None = None,
    dim: int = 1,
) -> torch.Tensor:
    """An exact one-hot Gumbel-max sample whose gradient is the ReinMax estimate (Liu et al. 2023, Algorithm 2).

    With ``D`` the one-hot sample, ``pi0 = softmax(logits)`` and ``pi1 = (D + softmax(logits / temperature)) / 2``,
    the gradient is that of ``2 * pi1 - pi0 / 2`` where ``pi1`` is differentiated as a softmax evaluated at ``pi1``
    (``softmax(stop_grad(log pi1 - logits) + logits)``). This matches DALLE-pytorch's ``reinmax=True`` (1.6.x): a
    second-order accurate estimator, where plain straight-through is first-order.
    """
    one_hot = gumbel_sample(logits, temperature, hard=True, generator=generator, dim=dim).detach()
    pi0 = logits.softmax(dim=dim)
    pi1 = (one_hot + (logits / temperature).softmax(dim=dim)) / 2
    # The clamp keeps log finite where pi1 underflows to 0 (DALLE-pytorch clamps at the same 1e-20).
    pi1 = ((pi1.clamp_min(1e-20).log() - logits).detach() + logits).softmax(dim=dim)
    pi2 = 2 * pi1 - 0.5 * pi0
    # (pi2 - pi2.detach()) is exactly zero in the forward pass, so the value is exactly one_hot.
    return one_hot + (pi2 - pi2.detach())
