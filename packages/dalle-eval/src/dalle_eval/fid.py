"""FID and KID from image features, computed here from the formulas (float64) so every step can be checked.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two feature sets,
  ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2)``. The last trace equals ``tr((S1 S2)^1/2)`` and
  is computed from symmetric eigen-decompositions, which stay real and stable where a general matrix square root of
  the non-symmetric ``S1 S2`` can pick up imaginary noise.
- KID (Bińkowski et al. 2018): the unbiased estimate of the squared MMD with the polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (its standard deviation reported beside it).

Features come from any callable ``float[B, 3, H, W] in [0, 1] -> float[B, D]``: the FID Inception
(:mod:`dalle_eval.inception`, local weights) for numbers comparable with papers, or any other network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dalle_core.errors import ShapeError

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def extract_features(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Run ``extractor`` over ``float[N, 3, H, W]`` images ``batch_size`` at a time: ``float64[N, D]`` on the CPU."""
    if images.ndim != 4 or len(images) == 0:
        raise ShapeError(f"expected a non-empty image batch [N, C, H, W], got shape {tuple(images.shape)}")
    chunks = [extractor(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return torch.cat([chunk.detach().to("cpu", torch.float64).flatten(1) for chunk in chunks])


def _check_features(features: torch.Tensor, name: str, minimum: int = 2) -> torch.Tensor:
    if features.ndim != 2 or features.shape[0] < minimum:
        raise ShapeError(f"{name}: expected features [N >= {minimum}, D], got shape {tuple(features.shape)}")
    return features.to(torch.float64)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``float64[D]`` and sample covariance ``float64[D, D]`` (divided by N - 1) of ``features[N, D]``."""
    features = _check_features(features, "feature_statistics")
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (features.shape[0] - 1)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (covariances symmetric PSD)."""
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ShapeError(
            f"expected means [D] and covariances [D, D] of one D, got {tuple(mu1.shape)}, {tuple(sigma1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(sigma2.shape)}"
        )
    root1 = _symmetric_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(distance.clamp_min(0))


def frechet_distance_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID of two feature sets ``[N, D]`` and ``[M, D]`` (each needs at least 2 rows)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """``(x y^T / D + coef) ^ degree``: KID's kernel (D the feature size)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD of ``x[m, D]`` and ``y[n, D]`` under :func:`polynomial_kernel` (may be slightly < 0)."""
    x, y = _check_features(x, "KID real"), _check_features(y, "KID fake")
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID as ``(mean, std)`` over ``subsets`` random subsets of ``subset_size`` rows drawn from each set.

    When both sets have at most ``subset_size`` rows the whole sets are compared once (std 0): the estimate is then
    exact for the data given, not a sample of it.
    """
    real, fake = _check_features(real, "KID real"), _check_features(fake, "KID fake")
    if subset_size < 2 or subsets < 1:
        raise ShapeError(f"KID needs subset_size >= 2 and subsets >= 1, got {subset_size} and {subsets}")
    if real.shape[0] <= subset_size and fake.shape[0] <= subset_size:
        return polynomial_mmd(real, fake), 0.0
    size = min(subset_size, real.shape[0], fake.shape[0])
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick_real = torch.randperm(real.shape[0], generator=generator)[:size]
        pick_fake = torch.randperm(fake.shape[0], generator=generator)[:size]
        values.append(polynomial_mmd(real[pick_real], fake[pick_fake]))
    scores = torch.tensor(values, dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False))
