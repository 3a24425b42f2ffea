"""Structural similarity (Wang et al. 2004) with its usual constants, written out so the choices are visible.

A Gaussian window of 11 taps and sigma 1.5, ``K1 = 0.01``, ``K2 = 0.03``, local statistics weighted by the window
(population, not sample, covariance), evaluated only where the window fits inside the image ("valid"), averaged over
positions and channels. This matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False, data_range=1)`` and the original MATLAB code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dalle_core.errors import ShapeError

WINDOW_SIZE = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = SIGMA, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The normalised 1-D Gaussian ``float[size]`` centred on the middle tap."""
    offsets = torch.arange(size, dtype=dtype) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def _blur(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable valid-mode filtering of ``[B, C, H, W]`` per channel."""
    channels = images.shape[1]
    rows = window.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    cols = window.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    return F.conv2d(F.conv2d(images, rows, groups=channels), cols, groups=channels)


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The local SSIM of two ``float[B, C, H, W]`` batches: ``float64[B, C, H - 10, W - 10]``."""
    if a.shape != b.shape or a.ndim != 4:
        raise ShapeError(
            f"expected two image batches [B, C, H, W] of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[-2:]) < WINDOW_SIZE:
        raise ShapeError(f"SSIM needs images of at least {WINDOW_SIZE}x{WINDOW_SIZE} pixels, got {tuple(a.shape[-2:])}")
    window = gaussian_window().to(a.device)
    x, y = a.to(torch.float64), b.to(torch.float64)
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    var_x = _blur(x * x, window) - mu_x**2
    var_y = _blur(y * y, window) - mu_y**2
    cov = _blur(x * y, window) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of each image pair: ``float64[B]``, 1 for identical images (``data_range`` 1 for [0, 1] images)."""
    return ssim_map(a, b, data_range).mean(dim=(1, 2, 3))
