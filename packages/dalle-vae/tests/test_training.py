"""Training on a tiny batch of synthetic images actually learns, with and without input normalization."""

from __future__ import annotations

import math

import torch

from dalle_vae import DiscreteVAE


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def test_training_cuts_reconstruction_loss(trained: tuple[DiscreteVAE, list[float]]) -> None:
    _, history = trained
    initial, final = history[0], sum(history[-10:]) / 10
    assert initial > 0.1  # an untrained decoder outputs roughly zero for images with mean ~0.4
    assert final < 0.1 * initial, f"reconstruction loss {initial:.4f} -> {final:.4f}"


def test_trained_tokens_round_trip(trained: tuple[DiscreteVAE, list[float]], squares: torch.Tensor) -> None:
    model, _ = trained
    ids = model.encode(squares)
    reconstruction = model.decode(ids)
    baseline = float(((squares - squares.mean(dim=0, keepdim=True)) ** 2).mean())  # best input-independent guess
    mse = float(((reconstruction - squares) ** 2).mean())
    assert mse < 0.25 * baseline, f"token round trip MSE {mse:.5f} vs mean-image baseline {baseline:.5f}"
    assert _psnr(reconstruction, squares) > 18.0
    # Within each image, the 4 grid cells under the square and the 12 background cells never share a code.
    in_square = (squares.mean(dim=1).unfold(1, 4, 4).unfold(2, 4, 4).mean(dim=(-1, -2)) > 0.45).flatten(1)
    assert in_square.sum(dim=1).tolist() == [4] * len(squares)
    for row, mask in zip(ids, in_square, strict=True):
        assert not set(row[mask].tolist()) & set(row[~mask].tolist())


def test_loss_reconstructions_are_in_image_space(
    trained: tuple[DiscreteVAE, list[float]], squares: torch.Tensor
) -> None:
    model, _ = trained
    result = model.loss(squares, generator=torch.Generator().manual_seed(1))
    assert not result.reconstructions.requires_grad
    assert result.reconstructions.shape == squares.shape
    assert float(((result.reconstructions - squares) ** 2).mean()) < 0.02


def test_normalized_model_decodes_to_unit_range(
    trained_normalized: tuple[DiscreteVAE, list[float]], squares: torch.Tensor
) -> None:
    model, history = trained_normalized
    assert sum(history[-10:]) / 10 < 0.1 * history[0]
    ids = model.encode(squares)
    reconstruction = model.decode(ids)
    assert float(reconstruction.min()) >= 0.0 and float(reconstruction.max()) <= 1.0
    assert _psnr(reconstruction, squares) > 18.0
    # The decoder itself works in normalized space ((x - 0.5) / 0.5): dark backgrounds come out strongly negative.
    codes = model.codebook(ids.view(-1, 4, 4)).permute(0, 3, 1, 2)
    with torch.no_grad():
        raw = model.decoder(codes)
    assert float(((raw - (2 * squares - 1)) ** 2).mean()) < 4 * 0.02
    background = (squares.mean(dim=1, keepdim=True) < 0.4).expand_as(raw)
    assert float(raw[background].mean()) < -0.4  # backgrounds average 0.15 in image space, -0.7 normalized
    # And loss() reports reconstructions in image space too.
    result = model.loss(squares, generator=torch.Generator().manual_seed(1))
    assert float(result.reconstructions.min()) >= 0.0
    assert float(((result.reconstructions - squares) ** 2).mean()) < 0.02
