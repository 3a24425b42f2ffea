"""Generate N, keep the K that a scorer (CLIP) likes best for their own prompt."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dalle_core.errors import DalleError
from dalle_eval.pipeline import Generation

# images float[B, 3, H, W], their prompts -> one score per image (higher is better), e.g. ClipScorer.cosine
Scorer = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


@dataclass(frozen=True)
class Reranked:
    """``kept``: the best ``keep`` images of each prompt, best first, with their scores. ``scores[i]``: the score of
    candidate ``i`` of the original generation. ``kept_indices``: the candidates kept, in ``kept``'s order."""

    kept: Generation
    scores: torch.Tensor
    kept_indices: tuple[int, ...]


def rerank(generation: Generation, scorer: Scorer, keep: int) -> Reranked:
    """Score every image against its prompt and keep the ``keep`` best per prompt (ties: the earlier sample).

    Prompts keep their order. Prompts are told apart by ``generation.prompt_indices`` (so a repeated prompt text is
    ranked within each occurrence), or by text when the generation has no indices.
    """
    if keep < 1:
        raise DalleError(f"keep must be >= 1, got {keep}")
    scores = scorer(generation.images, list(generation.prompts)).detach().float().cpu()
    if scores.shape != (len(generation.prompts),):
        raise DalleError(
            f"the scorer must return one score per image ({len(generation.prompts)}), got {tuple(scores.shape)}"
        )
    keys = generation.prompt_indices or generation.prompts
    groups: dict[object, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    kept: list[int] = []
    for members in groups.values():
        # A stable sort on the negated score keeps the earlier sample first among equal scores.
        order = sorted(members, key=lambda i: -float(scores[i]))
        kept.extend(order[:keep])
    return Reranked(generation.select(kept, [float(scores[i]) for i in kept]), scores, tuple(kept))
