"""How much of a codebook a set of token ids uses: a VAE whose codes collapse to a few is a poor tokenizer."""

from __future__ import annotations

import torch


def codebook_usage(ids: torch.Tensor, num_tokens: int) -> dict[str, float]:
    """``codes_used`` (distinct ids), ``usage_fraction`` (of ``num_tokens``) and ``perplexity`` (exp of the entropy
    of the id histogram: the effective number of codes, equal to ``codes_used`` when all are equally frequent)."""
    counts = torch.bincount(ids.flatten().long(), minlength=num_tokens).double()
    probs = counts[counts > 0] / counts.sum()
    entropy = float(-(probs * probs.log()).sum())
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage_fraction": used / num_tokens, "perplexity": float(torch.tensor(entropy).exp())}
