"""Pure functions on logits: temperature, top-k (a count or a fraction of the vocabulary), top-p, seeded sampling.

Order of operations in :func:`sample_logits`: top-k on the logits, then temperature, then top-p on the tempered
probabilities (top-k does not depend on the temperature; top-p does), then one draw per row (:func:`draw`).
Both filters keep every value tied with the last one kept, so results never depend on how ties are ordered.
"""

from __future__ import annotations

import math

import torch

from dalle_core.errors import ConfigError, DalleError
from dalle_transformer import native


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sampling_args(temperature: float, top_k: int | None, vocab_size: int, top_p: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``temperature > 0``, ``top_k`` is None or in ``[1, vocab_size]`` and
    ``top_p`` is None or in ``(0, 1]``."""
    if not _is_number(temperature) or not math.isfinite(temperature) or not temperature > 0:
        raise ConfigError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ConfigError(f"top_k: expected None or an integer in [1, {vocab_size}], got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def resolve_top_k(top_k: int | None, top_k_fraction: float | None, vocab_size: int) -> int | None:
    """The top-k count from either a count or a fraction (in ``(0, 1]``) of ``vocab_size``; never both.

    A fraction keeps ``max(1, int(top_k_fraction * vocab_size))`` values. DALLE-pytorch's ``filter_thres=t`` is
    ``top_k_fraction = 1 - t`` (see :func:`top_k_from_filter_thres` for its exact rounding).
    """
    if top_k_fraction is None:
        return top_k
    if top_k is not None:
        raise ConfigError(f"top_k={top_k!r} and top_k_fraction={top_k_fraction!r}: give at most one of them")
    if not _is_number(top_k_fraction) or not 0.0 < top_k_fraction <= 1.0:
        raise ConfigError(f"top_k_fraction: expected None or a number in (0, 1], got {top_k_fraction!r}")
    return max(1, int(top_k_fraction * vocab_size))


def top_k_from_filter_thres(filter_thres: float, vocab_size: int) -> int:
    """DALLE-pytorch's ``top_k(logits, thres)`` count, ``max(int((1 - thres) * vocab_size), 1)``, for ``vocab_size``
    the image vocabulary (DALLE-pytorch 1.6.6 used the text + image vocabulary there, which was a defect)."""
    if not _is_number(filter_thres) or not 0.0 <= filter_thres < 1.0:
        raise ConfigError(f"filter_thres: expected a number in [0, 1), got {filter_thres!r}")
    return max(int((1 - filter_thres) * vocab_size), 1)


def filter_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Logits with everything below the ``top_k``-th largest value (per row, last dim) set to ``-inf``.

    Values tied with the ``top_k``-th largest are all kept, so the result does not depend on how ties are ordered.
    """
    vocab = logits.shape[-1]
    if top_k is None or top_k >= vocab:
        return logits
    if logits.device.type == "cpu" and top_k * 8 > vocab:
        # The same value by selection: on the CPU 1.3-4x faster than topk when keeping more than 1/8 of the
        # vocabulary (DALLE-pytorch's default keeps half), slower when keeping a few percent.
        kth = torch.kthvalue(logits, vocab - top_k + 1, dim=-1, keepdim=True).values
    else:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the most likely values whose probabilities, summed in decreasing order, first reach
    ``top_p`` (at least one value, plus every value tied with the last one kept); the rest become ``-inf``."""
    if top_p is None or top_p >= 1.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    sorted_probs = probs.sort(dim=-1, descending=True).values
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = mass_before < top_p  # the first value always is: nothing comes before it
    smallest_kept = sorted_probs.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(probs < smallest_kept, float("-inf"))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one id per row of ``logits`` (``[batch, vocab]``) -> ``int64[batch]`` on the logits' device.

    Probabilities are computed in at least float32. When ``generator`` lives on another device than the logits (a CPU
    generator for a GPU model), sampling happens on the generator's device, so one seed gives the same ids wherever
    the model runs. Float32 CPU logits without ``top_p`` are drawn by :func:`dalle_transformer.native.sample_rows`
    where it is built: one pass per row, from the same uniforms, the same ids up to float rounding at near-ties.
    """
    if not logits.dtype.is_floating_point or logits.dtype.itemsize < 4:
        logits = logits.float()
    library = native.library_for(logits) if top_p is None else None
    if (
        library is not None
        and (generator is None or generator.device.type == "cpu")
        and native.sample_rows_takes(logits, top_k, temperature)
    ):
        # The same draw in one C pass, from the uniforms draw() would take from the generator.
        uniform = torch.rand(logits.shape, dtype=logits.dtype, generator=generator)
        try:
            return native.sample_rows(library, logits, uniform, top_k, temperature)
        except native.UnsampleableRow:
            pass  # the operations below raise the error that names every such row
    tempered = filter_top_p(apply_temperature(filter_top_k(logits, top_k), temperature), top_p)
    probs = torch.softmax(tempered, dim=-1)
    if generator is not None and generator.device != probs.device:
        return draw(probs.to(generator.device), generator).to(logits.device)
    return draw(probs, generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of ``probs`` (``[batch, vocab]``, non-negative) with probability proportional to its entry.

    On the CPU the id of the largest ``p / E`` with ``E ~ Exp(1)`` drawn per id, the race ``torch.multinomial`` runs
    too (so float rounding of ``probs`` changes the winner only at near-ties), with ``E = -log(U)`` from
    ``torch.rand``: multinomial's ``exponential_`` is 4-6x slower on the machine of docs/benchmarks.md (62 -> 13 us
    for 4 rows of 1024 ids, 495 -> 85 for 8192). Elsewhere ``torch.multinomial``. Raises :class:`DalleError` for
    a row that is not finite or sums to 0.
    """
    if probs.device.type != "cpu":
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    # U >= the smallest normal float keeps E finite, and U < 1 keeps it > 0: an id of probability 0 scores 0 and
    # cannot beat the most probable id, whose score is > 0.
    uniform = torch.rand(probs.shape, dtype=probs.dtype, generator=generator)
    exponential = uniform.clamp_(min=torch.finfo(probs.dtype).tiny).log_().neg_()
    best, ids = probs.div(exponential).max(-1)
    # As E is finite and > 0, a row's best score is finite and > 0 when its probabilities are finite with a positive
    # sum (max propagates NaN), and then the sum of the best scores' logs is finite: three small operations where
    # checking the sums took six (each costing a decoding step tens of microseconds with the caches cold from the
    # weights streamed between). The sums are checked only when that fails.
    if math.isfinite(best.log().sum().item()):
        return ids
    total = probs.sum(-1)
    usable = torch.isfinite(total) & (total > 0)
    if not bool(usable.all()):
        raise DalleError(
            "sampling: expected finite probabilities with a positive sum in every row, got rows "
            f"{torch.nonzero(~usable).flatten().tolist()} without (NaN or infinite logits give such rows)"
        )
    # Every score of a row underflowed to 0 (all its probabilities below ~1e-36): the same race on the probabilities
    # scaled to a maximum of 1.
    return probs.div(probs.amax(-1, keepdim=True)).div_(exponential).argmax(-1)
