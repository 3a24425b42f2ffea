from __future__ import annotations

import math

import pytest
import torch

from dalle_core.errors import ShapeError
from dalle_eval.fid import (
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    kernel_inception_distance,
    polynomial_mmd,
)
from dalle_eval.metrics import distribution_metrics


def random_covariance(dim: int, generator: torch.Generator) -> torch.Tensor:
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return factor @ factor.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_fid_of_diagonal_gaussians_has_the_closed_form():
    # Commuting (diagonal) covariances: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so FID = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]).double(), torch.tensor([0.5, 1.0, 0.0]).double()
    a, b = torch.tensor([1.0, 4.0, 0.25]).double(), torch.tensor([2.0, 1.0, 0.25]).double()
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_of_scaled_covariances_has_the_closed_form():
    # S2 = c^2 S1 (not diagonal): tr((S1 S2)^1/2) = c tr(S1), so FID = |dmu|^2 + (1 - c)^2 tr(S1).
    generator = torch.Generator().manual_seed(0)
    sigma = random_covariance(6, generator)
    mu1, mu2 = (torch.randn(6, generator=generator, dtype=torch.float64) for _ in range(2))
    c = 1.7
    expected = float((mu1 - mu2).square().sum() + (1 - c) ** 2 * sigma.trace())
    assert frechet_distance(mu1, sigma, mu2, c * c * sigma) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu1, sigma, mu1, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_matches_scipy_sqrtm_on_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(1)
    s1, s2 = random_covariance(8, generator), random_covariance(8, generator)
    mu1, mu2 = (torch.randn(8, generator=generator, dtype=torch.float64) for _ in range(2))
    root = linalg.sqrtm((s1 @ s2).numpy()).real
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()) - 2 * float(root.trace())
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    generator = torch.Generator().manual_seed(2)
    n, dim = 20000, 3
    real = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    fake = torch.randn(n, dim, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
    expected = 3 * 1.0 + (1 - 1) ** 2 + (1 - 2) ** 2 + (1 - 0.5) ** 2
    assert frechet_distance_from_features(real, fake) == pytest.approx(expected, abs=0.06)


def test_statistics_are_the_sample_mean_and_unbiased_covariance():
    features = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    mean, cov = feature_statistics(features)
    assert torch.allclose(mean, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.tensor([[1.0, -1.0], [-1.0, 4.0]], dtype=torch.float64))


def naive_kid(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased MMD^2 estimator, term by term, with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(9, 4, generator=generator, dtype=torch.float64) + 0.5
    assert polynomial_mmd(x, y) == pytest.approx(naive_kid(x, y), rel=1e-12)
    mean, std = kernel_inception_distance(x, y, subset_size=100)
    assert (mean, std) == (pytest.approx(naive_kid(x, y), rel=1e-12), 0.0)


def test_kid_subsets_average_the_estimator_over_random_subsets():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(30, 3, generator=generator, dtype=torch.float64) * 1.5 + 1.0
    mean, std = kernel_inception_distance(x, y, subset_size=10, subsets=5, seed=9)
    picks = torch.Generator().manual_seed(9)
    values = []
    for _ in range(5):
        i, j = torch.randperm(40, generator=picks)[:10], torch.randperm(30, generator=picks)[:10]
        values.append(naive_kid(x[i], y[j]))
    assert mean == pytest.approx(sum(values) / 5, rel=1e-10)
    assert std == pytest.approx(float(torch.tensor(values, dtype=torch.float64).std(unbiased=False)), rel=1e-8)
    # The unbiased estimator is centred on zero for one distribution, on the population MMD^2 > 0 otherwise.
    same = kernel_inception_distance(x[:20], x[20:], subset_size=100)[0]
    assert abs(same) < kernel_inception_distance(x, y, subset_size=100)[0]


def test_distribution_metrics_run_the_extractor_then_the_formulas(tiny_features):
    torch.manual_seed(5)
    extractor = tiny_features()
    real, fake = torch.rand(10, 3, 16, 16), torch.rand(8, 3, 16, 16) ** 2
    result = distribution_metrics(extractor, real, fake, batch_size=3)
    with torch.no_grad():
        real_features, fake_features = extractor(real).double(), extractor(fake).double()
    assert torch.allclose(extract_features(extractor, real, batch_size=4), real_features, atol=1e-6)
    assert result["fid"] == pytest.approx(frechet_distance_from_features(real_features, fake_features), rel=1e-5)
    assert result["kid"] == pytest.approx(naive_kid(real_features, fake_features), rel=1e-5)
    assert result["fid"] > 0 and (result["real_images"], result["fake_images"]) == (10, 8)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_fid_and_kid_match_torchmetrics(tiny_features):
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    kid_module = pytest.importorskip("torchmetrics.image.kid")
    torch.manual_seed(6)
    extractor = tiny_features()
    real, fake = torch.rand(12, 3, 16, 16), torch.rand(12, 3, 16, 16) * 0.7
    ours = distribution_metrics(extractor, real, fake, kid_subset_size=12, kid_subsets=1)
    fid = fid_module.FrechetInceptionDistance(feature=extractor, normalize=True)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(fid.compute()), rel=1e-4)
    kid = kid_module.KernelInceptionDistance(feature=extractor, normalize=True, subsets=1, subset_size=12)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    assert ours["kid"] == pytest.approx(float(kid.compute()[0]), rel=1e-4)
    assert not math.isclose(ours["fid"], 0.0)


def test_bad_feature_shapes():
    with pytest.raises(ShapeError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(ShapeError, match="one D"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3))
