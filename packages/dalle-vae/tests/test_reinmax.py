"""The ReinMax estimator against its closed-form gradient, and inside the model's loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dalle_vae import DiscreteVAE, gumbel_sample, reinmax_sample


def _softmax_jacobian_times(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(diag(p) - p p^T) v`` along dim 1 of ``[B, K, ...]`` tensors: the vector-Jacobian product of a softmax."""
    return p * v - p * (p * v).sum(dim=1, keepdim=True)


def test_value_is_the_gumbel_max_one_hot() -> None:
    logits = torch.randn(3, 9, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = reinmax_sample(logits, 0.7, generator=torch.Generator().manual_seed(1))
    hard = gumbel_sample(logits, 0.7, hard=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample, hard)  # the same noise, and exactly 0.0 / 1.0 entries
    assert set(sample.unique().tolist()) == {0.0, 1.0}


def test_gradient_matches_closed_form() -> None:
    # ReinMax (Liu et al. 2023): d/dlogits of <w, D> is taken as J(pi1) (2 w) - J(pi0) (w / 2), where J(p) is the
    # softmax Jacobian at p, pi0 = softmax(logits), pi1 = (D + softmax(logits / tau)) / 2 and D the one-hot sample.
    tau = 0.6
    logits = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 7, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sample = reinmax_sample(logits, tau, generator=torch.Generator().manual_seed(4))
    (gradient,) = torch.autograd.grad((sample * weights).sum(), logits)

    one_hot = sample.detach()
    pi0 = logits.detach().softmax(dim=1)
    pi1 = (one_hot + (logits.detach() / tau).softmax(dim=1)) / 2
    expected = 2 * _softmax_jacobian_times(pi1, weights) - 0.5 * _softmax_jacobian_times(pi0, weights)
    assert torch.allclose(gradient, expected, atol=1e-12)
    # And it is not the straight-through gradient (the Jacobian of softmax((logits + g) / tau)).
    straight = gumbel_sample(logits, tau, hard=True, generator=torch.Generator().manual_seed(4))
    (straight_gradient,) = torch.autograd.grad((straight * weights).sum(), logits)
    assert not torch.allclose(gradient, straight_gradient, atol=1e-3)


def test_model_uses_reinmax_when_configured(make_model: Callable[..., DiscreteVAE]) -> None:
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    gradients = {}
    losses = {}
    for reinmax in (False, True):
        model = make_model(straight_through=True, reinmax=reinmax)
        result = model.loss(images, generator=torch.Generator().manual_seed(6))
        result.loss.backward()
        losses[reinmax] = result.loss.item()
        gradients[reinmax] = model.encoder[0].weight.grad.clone()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    # Same hard codes, so the same loss value; different estimators, so different encoder gradients.
    assert losses[True] == losses[False]
    assert not torch.allclose(gradients[True], gradients[False])
