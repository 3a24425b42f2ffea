from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dalle_core.errors import ShapeError
from dalle_eval.ssim import ssim


def naive_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM from the paper: a 2-D Gaussian window visited at every position where it fits, channel by channel."""
    offsets = np.arange(11) - 5.0
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for channel in range(a.shape[0]):
        for top in range(a.shape[1] - 10):
            for left in range(a.shape[2] - 10):
                x = a[channel, top : top + 11, left : left + 11]
                y = b[channel, top : top + 11, left : left + 11]
                mx, my = (window * x).sum(), (window * y).sum()
                vx, vy = (window * (x - mx) ** 2).sum(), (window * (y - my) ** 2).sum()
                cov = (window * (x - mx) * (y - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_constant_images_have_the_closed_form():
    # Flat images: no variance, so SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.7
    flat = {"size": (1, 3, 16, 16), "dtype": torch.float64}
    got = ssim(torch.full(fill_value=a, **flat), torch.full(fill_value=b, **flat))
    c1 = 0.01**2
    assert float(got[0]) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-10)


def test_identical_images_score_one_and_a_negated_pattern_scores_near_minus_one():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 20, 24)
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64))
    # y = 1 - x around mean 0.5: equal means and variances, covariance -var, so the structure term is near -1.
    assert float(ssim(images, 1 - images)[0]) < -0.9


def test_matches_the_naive_definition():
    rng = np.random.default_rng(1)
    a = rng.random((3, 15, 17))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    got = float(ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0])
    assert got == pytest.approx(naive_ssim(a, b), abs=1e-12)


def test_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(2)
    a = rng.random((3, 32, 32))
    b = np.clip(a * 0.8 + 0.1 * rng.random(a.shape), 0, 1)
    reference = metrics.structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=0
    )
    got = float(ssim(torch.from_numpy(a)[None], torch.from_numpy(b)[None])[0])
    assert got == pytest.approx(reference, abs=1e-9)
    assert not math.isclose(got, 1.0)


def test_small_or_mismatched_images_are_refused():
    with pytest.raises(ShapeError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
    with pytest.raises(ShapeError, match="same shape"):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))
