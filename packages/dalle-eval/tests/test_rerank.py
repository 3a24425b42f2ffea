from __future__ import annotations

import pytest
import torch

from dalle_core.errors import DalleError
from dalle_eval.pipeline import SamplingOptions, generate
from dalle_eval.rerank import rerank
from dalle_train.bundle import Bundle


def redness(images: torch.Tensor, prompts) -> torch.Tensor:
    """A transparent scorer: how much redder than green and blue an image is on average."""
    return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def test_rerank_keeps_the_best_of_each_prompt_in_order(bundle: Bundle):
    drawn = generate(bundle, ["a", "b", "c"], 5, SamplingOptions(seed=2))
    result = rerank(drawn, redness, keep=2)
    scores = redness(drawn.images, drawn.prompts)
    expected = []
    for prompt in range(3):
        members = list(range(prompt * 5, prompt * 5 + 5))
        expected += sorted(members, key=lambda i: float(scores[i]), reverse=True)[:2]
    assert list(result.kept_indices) == expected
    assert result.kept.prompts == ("a", "a", "b", "b", "c", "c")
    assert torch.equal(result.kept.images, drawn.images[expected])
    assert result.kept.seeds == tuple(drawn.seeds[i] for i in expected)
    assert result.kept.scores == pytest.approx([float(scores[i]) for i in expected])
    assert torch.allclose(result.scores, scores)


def test_rerank_bad_requests(bundle: Bundle):
    drawn = generate(bundle, ["a"], 2, SamplingOptions(seed=2))
    with pytest.raises(DalleError, match="keep must be >= 1"):
        rerank(drawn, redness, keep=0)
    with pytest.raises(DalleError, match="one score per image \\(2\\), got \\(1,\\)"):
        rerank(drawn, lambda images, prompts: torch.zeros(1), keep=1)
