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
