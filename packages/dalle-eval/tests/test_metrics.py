from __future__ import annotations

import math

import pytest
import torch

from dalle_eval.metrics import psnr, reconstruction_metrics
from dalle_vae import DiscreteVAE, DiscreteVAEConfig
from dalle_vae.usage import codebook_usage


def test_psnr_formula():
    assert float(psnr(torch.tensor(0.01))) == pytest.approx(20.0)
    assert float(psnr(torch.tensor(1.0))) == pytest.approx(0.0)


def test_codebook_usage_against_hand_counts():
    ids = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    usage = codebook_usage(ids, num_tokens=8)
    assert usage["codes_used"] == 4 and usage["usage_fraction"] == 0.5
    assert usage["perplexity"] == pytest.approx(4.0)
    skewed = codebook_usage(torch.tensor([0, 0, 0, 1]), num_tokens=2)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed["perplexity"] == pytest.approx(math.exp(entropy))


def test_reconstruction_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    vae = DiscreteVAE(
        DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8)
    ).eval()
    images = torch.rand(5, 3, 16, 16)
    metrics = reconstruction_metrics(vae, images, batch_size=2)
    ids = vae.encode(images)
    per_image = ((vae.decode(ids) - images) ** 2).mean(dim=(1, 2, 3))
    assert metrics["mse"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert metrics["psnr"] == pytest.approx(float((10 * torch.log10(1 / per_image)).mean()), rel=1e-5)
    assert metrics["codes_used"] == len(ids.unique())
