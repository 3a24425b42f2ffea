"""Sampling image ids (with guidance, priming and previews) and completing texts, cached or not.

Every entry point validates all its inputs first, runs the model in eval mode under ``torch.inference_mode`` (the
mode is restored afterwards), never writes into the caller's tensors and returns an ordinary (non-inference) tensor.
The cached and uncached paths feed the model the same tokens and draw the same random numbers, so for one seed they
give the same ids (up to float rounding of nearly tied probabilities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from dalle_core.errors import ConfigError
from dalle_transformer.inputs import (
    check_callback,
    check_cond_scale,
    check_text_ids,
    resolve_num_init_tokens,
)
from dalle_transformer.sampling import check_sampling_args, resolve_top_k, sample_logits

if TYPE_CHECKING:
    from dalle_transformer.model import DALLE

PreviewCallback = Callable[[int, torch.Tensor], object]


@dataclass(frozen=True)
class Sampler:
    """Validated sampling settings and the generator they draw from (or one generator per row)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    row_generators: tuple[torch.Generator, ...] | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.row_generators is None:
            return self._draw(logits, self.generator)
        # One draw per row from its own generator: a row's ids do not depend on the rest of the batch.
        return torch.cat([self._draw(logits[i : i + 1], g) for i, g in enumerate(self.row_generators)])

    def _draw(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return sample_logits(
            logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, generator=generator
        )


def check_row_generators(
    generator: torch.Generator | None, row_generators: Sequence[torch.Generator] | None, batch_size: int
) -> tuple[torch.Generator, ...] | None:
    if row_generators is None:
        return None
    if generator is not None:
        raise ConfigError("generator and row_generators: give at most one of them")
    if isinstance(row_generators, torch.Generator) or not all(isinstance(g, torch.Generator) for g in row_generators):
        raise ConfigError("row_generators: expected a sequence of torch.Generator, one per row")
    if len(row_generators) != batch_size:
        raise ConfigError(f"row_generators: expected one generator per row ({batch_size}), got {len(row_generators)}")
    return tuple(row_generators)


def generate_image_ids(
    model: DALLE,
    text_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_k_fraction: float | None = None,
    top_p: float | None = None,
    cond_scale: float = 1.0,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    init_image_ids: torch.Tensor | None = None,
    num_init_img_tokens: int | None = None,
    callback: PreviewCallback | None = None,
    callback_every: int = 1,
) -> torch.Tensor:
    """Sample ``int64[B, image_seq_len]`` image ids conditioned on ``text_ids`` (``int[B, <= text_seq_len]``).

    - ``top_k`` keeps the ``top_k`` most likely image codes, ``top_k_fraction`` (in ``(0, 1]``) keeps
      ``max(1, int(top_k_fraction * num_image_tokens))`` of them (give at most one); ``top_p`` keeps the nucleus of
      probability mass ``top_p`` after ``temperature``. Ties with the last value kept are kept too.
    - ``cond_scale`` (classifier-free guidance): logits ``null + (cond - null) * cond_scale``, where ``null`` is the
      model's prediction for the all-padding text; conditional and null rows run as one batch of ``2B`` (and share
      one cache). At ``cond_scale=1`` no null rows are run.
    - ``init_image_ids`` (``int[B, k]``, e.g. a VAE's encoding of an image, ``k <= image_seq_len``) primes the image:
      its first ``num_init_img_tokens`` ids are kept as they are and the rest are sampled. Without
      ``num_init_img_tokens``: all ``k`` of a partial prefix, or ``int(0.4375 * image_seq_len)`` of a whole image.
    - ``callback(step, ids)`` is called every ``callback_every`` sampled tokens and after the last, with ``step``
      the number of image tokens known so far and ``ids`` a copy of them, ``int64[B, step]``.
    - ``generator`` seeds the draws (a CPU generator works for a model on any device, with the same ids up to
      float rounding); or ``row_generators``, one per row: then each row's ids depend only on its text, options and
      generator, not on the other rows of the batch (up to float rounding of the batched forward), so batching
      stays reproducible per image.
    """
    config = model.config
    top_k = resolve_top_k(top_k, top_k_fraction, config.num_image_tokens)
    check_sampling_args(temperature, top_k, config.num_image_tokens, top_p)
    check_cond_scale(cond_scale)
    check_callback(callback, callback_every)
    text = model.prepare_text(text_ids)
    prefix, keep = text.new_zeros(text.shape[0], 0), 0
    if init_image_ids is not None:
        prefix = model.check_image_prefix(init_image_ids, text.shape[0], "init_image_ids")
        keep = resolve_num_init_tokens(config, prefix, num_init_img_tokens)
    elif num_init_img_tokens is not None:
        raise ConfigError("num_init_img_tokens: given without init_image_ids to take the tokens from")
    rows = check_row_generators(generator, row_generators, text.shape[0])
    sampler = Sampler(float(temperature), top_k, top_p, generator, rows)
    with _eval_inference(model):
        ids = sample_image_ids(
            model,
            text,
            prefix[:, :keep],
            sampler,
            float(cond_scale),
            use_cache,
            cond_scale != 1,
            callback,
            callback_every,
        )
    return ids.clone()


def sample_image_ids(
    model: DALLE,
    text: torch.Tensor,
    prefix: torch.Tensor,
    sampler: Sampler,
    cond_scale: float,
    use_cache: bool,
    null_rows: bool,
    callback: PreviewCallback | None = None,
    callback_every: int = 1,
) -> torch.Tensor:
    """The sampling loop on validated inputs (prepared ``text`` ``[B, T]``, kept ``prefix`` ``[B, k]``).

    With ``null_rows`` the null condition runs beside the text in one ``2B`` batch and the logits are guided, even
    at ``cond_scale == 1`` (where the result equals the conditional logits exactly: the guidance is computed as
    ``cond + (cond - null) * (cond_scale - 1)``, which is ``null + (cond - null) * cond_scale``).
    """
    batch, n = text.shape[0], model.config.image_seq_len
    rows = torch.cat([text, model.null_text(batch)]) if null_rows else text

    def both(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids, ids]) if null_rows else ids

    out = torch.zeros(batch, n, dtype=torch.long, device=text.device)
    start = prefix.shape[1]
    out[:, :start] = prefix
    # The model's stepper feeds it only what its cache lacks (each architecture knows its own sequence layout).
    next_logits = model._image_stepper(rows, use_cache)
    for k in range(start, n):
        logits = next_logits(both(out[:, :k]))
        if null_rows:
            cond, null = logits.chunk(2)
            logits = cond + (cond - null) * (cond_scale - 1)
        out[:, k] = sampler(logits)
        if callback is not None and ((k + 1 - start) % callback_every == 0 or k + 1 == n):
            callback(k + 1, out[:, : k + 1].clone())
    return out


def generate_text_ids(
    model: DALLE,
    text_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Complete each text prefix (``int[B, k]``, ``0 <= k <= text_seq_len``) into ``int64[B, text_seq_len]`` text
    ids, as DALLE-pytorch's ``generate_texts``: tokens are sampled one by one over the text vocabulary (its
    per-position padding tokens included) until a row samples padding; from there on the row is ``text_pad_id``.
    A prefix that already holds ``text_pad_id`` is finished at its first padding.
    """
    config = model.config
    check_sampling_args(temperature, top_k, config.num_text_logits, top_p)
    check_text_ids(config, text_ids, "a text prefix")
    sampler = Sampler(float(temperature), top_k, top_p, generator)
    with _eval_inference(model):
        ids = _complete_text(model, text_ids.to(device=model.text_pad_ids.device, dtype=torch.long), sampler, use_cache)
    return ids.clone()


def _complete_text(model: DALLE, prefix: torch.Tensor, sampler: Sampler, use_cache: bool) -> torch.Tensor:
    config = model.config
    batch, start, length = prefix.shape[0], prefix.shape[1], config.text_seq_len
    pad_id, vocab = config.text_pad_id, config.num_text_tokens
    # Model-side ids: a finished row continues with the per-position padding tokens that training showed it.
    text = torch.empty(batch, length, dtype=torch.long, device=prefix.device)
    padded = (prefix == pad_id).cumsum(dim=1) > 0  # at or after the row's first padding
    text[:, :start] = torch.where(padded, model.text_pad_ids[:start], prefix)
    finished = padded[:, -1] if start > 0 else torch.zeros(batch, dtype=torch.bool, device=prefix.device)
    cache = model.new_cache(batch) if use_cache else None
    i = start
    while i < length and not bool(finished.all()):
        if cache is None or i == start:
            x = model._embed_prefix(text[:, :i])
        else:
            x = model._embed_text(text[:, i - 1 : i], start=i - 1)
        sampled = sampler(model._text_logits(model._transform(x, cache)[:, -1]))
        finished |= (sampled >= vocab) | (sampled == pad_id)
        text[:, i] = torch.where(finished, model.text_pad_ids[i], sampled)
        i += 1
    text[:, i:] = model.text_pad_ids[i:]
    return torch.where(text >= vocab, pad_id, text)


class _eval_inference:  # lower case: used like a function-style context manager
    """Eval mode and ``torch.inference_mode`` for the duration; the module's mode is restored afterwards."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)
