"""Pure functions on logits: temperature, top-k filtering and seeded sampling."""

from __future__ import annotations

import torch

from dalle_core.errors import ConfigError


def check_sampling_args(temperature: float, top_k: int | None, vocab_size: int) -> None:
    """Raise :class:`ConfigError` unless ``temperature > 0`` and ``top_k`` is None or in ``[1, vocab_size]``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ConfigError(f"temperature: expected a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ConfigError(f"top_k: expected None or an integer in [1, {vocab_size}], got {top_k!r}")


def filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Logits with everything below the ``top_k``-th largest value (per row, last dim) set to ``-inf``.

    Values tied with the ``top_k``-th largest are all kept, so the result does not depend on how ties are ordered.
    """
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row of ``logits`` (``[batch, vocab]``) -> ``int64[batch]`` on the logits' device.

    Probabilities are computed in at least float32. When ``generator`` lives on another device than the logits (a CPU
    generator for a GPU model), sampling happens on the generator's device, so one seed gives the same ids wherever
    the model runs.
    """
    if not logits.dtype.is_floating_point or logits.dtype.itemsize < 4:
        logits = logits.float()
    probs = torch.softmax(apply_temperature(filter_top_k(logits, top_k), temperature), dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
