"""``sampling.draw``: the categorical distribution its exponential race gives, against the probabilities themselves,
and its errors."""

from __future__ import annotations

import pytest
import torch

from dalle_core.errors import DalleError
from dalle_transformer.sampling import draw, sample_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_draw_frequencies_match_the_probabilities(dtype):
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7, 0.0], [3.0, 1.0, 0.0, 0.0, 0.0]], dtype=dtype)  # the second unnormalised
    draws = 40_000
    ids = draw(probs.repeat(draws, 1), torch.Generator().manual_seed(0)).view(draws, 2)
    assert ids.dtype == torch.int64
    for row in range(2):
        expected = probs[row].double() / probs[row].double().sum()
        counts = torch.bincount(ids[:, row], minlength=5).double()
        assert counts[expected == 0].sum() == 0  # an id of probability 0 is never drawn
        sigma = (draws * expected * (1 - expected)).sqrt()
        assert ((counts - draws * expected).abs() <= 5 * sigma + 1e-9).all(), (row, counts.tolist())


def test_draw_is_seeded_and_one_kept_id_always_wins():
    probs = torch.rand(6, 300, generator=torch.Generator().manual_seed(1))
    first = draw(probs, torch.Generator().manual_seed(7))
    assert torch.equal(first, draw(probs, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, draw(probs, torch.Generator().manual_seed(8)))
    single = torch.zeros(4096, 50)
    single[torch.arange(4096), torch.arange(4096) % 50] = 1e-30  # tiny but positive
    assert torch.equal(draw(single, torch.Generator().manual_seed(0)), torch.arange(4096) % 50)


def test_draw_scores_probabilities_too_small_to_divide():
    """Probabilities whose race scores underflow to 0 (here subnormal floats) are drawn from all the same."""
    probs = torch.tensor([[1e-44, 0.0, 3e-44], [0.5, 0.5, 0.0]]).repeat(2000, 1)
    ids = draw(probs, torch.Generator().manual_seed(0)).view(2000, 2)
    counts = torch.bincount(ids[:, 0], minlength=3)
    assert counts[1] == 0 and 350 < counts[0] < 650, counts.tolist()  # 1 in 4: the subnormals are 7 and 21 times 2^-149
    assert set(ids[:, 1].tolist()) == {0, 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_draw_rejects_rows_without_a_distribution(bad):
    probs = torch.tensor([[0.5, 0.5], [bad, 0.0 if bad == 0.0 else 1.0]])
    with pytest.raises(DalleError, match=r"rows \[1\]"):
        draw(probs, torch.Generator().manual_seed(0))
    with pytest.raises(DalleError, match="NaN or infinite logits"):
        sample_logits(torch.tensor([[0.0, float("nan")]]), generator=torch.Generator().manual_seed(0))
