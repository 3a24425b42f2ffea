"""The loss pieces against independent computations from their definitions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from dalle_core import ConfigError
from dalle_vae import DiscreteVAE, gumbel_sample, kl_to_uniform


def test_kl_matches_definition_on_random_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 2, 5, generator=generator, dtype=torch.float64) * 2
    q = logits.softmax(dim=1)
    # KL(q || uniform over 8) = sum_k q_k log(q_k * 8), summed over the 2x5 positions, averaged over the batch of 3.
    expected = float((q * torch.log(q * 8)).sum() / 3)
    assert kl_to_uniform(logits).item() == pytest.approx(expected, rel=1e-10)
    assert expected > 0


def test_kl_limits() -> None:
    uniform = torch.zeros(2, 16, 3, 3)
    assert kl_to_uniform(uniform).item() == pytest.approx(0.0, abs=1e-6)
    # A (numerically) deterministic q puts all mass on one code: log(16) per position, 9 positions per image.
    peaked = torch.full((2, 16, 3, 3), -100.0)
    peaked[:, 3] = 100.0
    assert kl_to_uniform(peaked).item() == pytest.approx(9 * math.log(16), rel=1e-5)


def test_kl_in_loss_uses_encoder_logits_and_weight(make_model: Callable[..., DiscreteVAE]) -> None:
    model = make_model(kl_div_loss_weight=0.25)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = model.loss(images, generator=torch.Generator().manual_seed(2))
    assert result.kl_loss.item() == pytest.approx(kl_to_uniform(model.logits(images)).item(), rel=1e-6)
    expected_total = result.reconstruction_loss.item() + 0.25 * result.kl_loss.item()
    assert result.loss.item() == pytest.approx(expected_total, rel=1e-6)
    unweighted = make_model()
    plain = unweighted.loss(images, generator=torch.Generator().manual_seed(2))
    assert plain.loss.item() == pytest.approx(plain.reconstruction_loss.item(), rel=1e-7)
    assert plain.kl_loss.item() > 0


@pytest.mark.parametrize("smooth_l1", [False, True])
@pytest.mark.parametrize("normalization", [None, ((0.4, 0.5, 0.6), (0.2, 0.3, 0.25))])
def test_reconstruction_loss_matches_manual_forward(
    make_model: Callable[..., DiscreteVAE], smooth_l1: bool, normalization: object
) -> None:
    model = make_model(smooth_l1_loss=smooth_l1, normalization=normalization, temperature=0.7)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    result = model.loss(images, generator=torch.Generator().manual_seed(4))

    if normalization is None:
        target = images
    else:
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in normalization)
        target = (images - mean) / std
    logits = model.encoder(target)
    # Gumbel(0, 1) noise drawn the same way, from the same seed.
    noise = -torch.empty_like(logits).exponential_(generator=torch.Generator().manual_seed(4)).log()
    soft = torch.softmax((logits + noise) / 0.7, dim=1)
    mixed = (soft.unsqueeze(2) * model.codebook.weight.view(1, 32, 16, 1, 1)).sum(dim=1)
    output = model.decoder(mixed)
    loss_fn = F.smooth_l1_loss if smooth_l1 else F.mse_loss
    assert result.reconstruction_loss.item() == pytest.approx(loss_fn(output, target).item(), rel=1e-5)
    if normalization is None:
        expected_images = output.clamp(0, 1)
    else:
        expected_images = (output * std + mean).clamp(0, 1)
    assert torch.allclose(result.reconstructions, expected_images, atol=1e-5)


def test_loss_temperature_argument_overrides_config(make_model: Callable[..., DiscreteVAE]) -> None:
    model = make_model(temperature=0.9)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def run(temperature: float | None) -> float:
        return model.loss(images, temperature, generator=torch.Generator().manual_seed(6)).loss.item()

    assert run(None) == run(0.9)
    assert run(0.3) != run(0.9)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="temperature"):
            model.loss(images, bad)


def test_loss_backpropagates_to_every_parameter(make_model: Callable[..., DiscreteVAE]) -> None:
    for straight_through in (False, True):
        model = make_model(straight_through=straight_through, kl_div_loss_weight=0.1)
        images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
        model.loss(images, generator=torch.Generator().manual_seed(8)).loss.backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_gumbel_soft_sample_is_a_distribution_and_seeded() -> None:
    logits = torch.randn(4, 10, 3, 3, generator=torch.Generator().manual_seed(0))
    first = gumbel_sample(logits, 0.9, generator=torch.Generator().manual_seed(1))
    again = gumbel_sample(logits, 0.9, generator=torch.Generator().manual_seed(1))
    other = gumbel_sample(logits, 0.9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.allclose(first.sum(dim=1), torch.ones(4, 3, 3))
    assert float(first.min()) >= 0 and 0 < float(first.max()) < 1


def test_gumbel_max_frequencies_match_softmax() -> None:
    # Gumbel-max trick: argmax of the sample is distributed as softmax(logits), at any temperature.
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    samples = gumbel_sample(logits.expand(40000, 4), 0.5, generator=torch.Generator().manual_seed(0), dim=1)
    frequencies = torch.bincount(samples.argmax(dim=1), minlength=4).float() / 40000
    assert torch.allclose(frequencies, logits.softmax(dim=0), atol=0.01)


def test_gumbel_hard_is_exactly_one_hot_with_soft_gradients() -> None:
    logits = torch.randn(3, 7, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    hard = gumbel_sample(logits, 0.9, hard=True, generator=torch.Generator().manual_seed(1))
    soft = gumbel_sample(logits, 0.9, hard=False, generator=torch.Generator().manual_seed(1))
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.detach().sum(dim=1), torch.ones(3, 2, 2))
    assert torch.equal(hard.argmax(dim=1), soft.argmax(dim=1))
    weights = torch.randn(3, 7, 2, 2, generator=torch.Generator().manual_seed(2))
    (hard_grad,) = torch.autograd.grad((hard * weights).sum(), logits)
    (soft_grad,) = torch.autograd.grad((soft * weights).sum(), logits)
    assert torch.allclose(hard_grad, soft_grad)  # straight-through: the gradient of the soft sample
    assert hard_grad.abs().sum() > 0


def test_straight_through_model_feeds_exact_codebook_rows_to_decoder(make_model: Callable[..., DiscreteVAE]) -> None:
    captured: list[torch.Tensor] = []
    for straight_through in (True, False):
        model = make_model(straight_through=straight_through)
        handle = model.decoder.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
        model.loss(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)))
        handle.remove()
    hard_codes, soft_codes = captured
    codebook = make_model().codebook.weight.detach()
    vectors = hard_codes.permute(0, 2, 3, 1).reshape(-1, 16)
    matches = (vectors.unsqueeze(1) == codebook.unsqueeze(0)).all(dim=-1)  # [positions, num_tokens]
    assert matches.sum(dim=1).tolist() == [1] * len(vectors)  # every vector is exactly one codebook row
    soft_vectors = soft_codes.permute(0, 2, 3, 1).reshape(-1, 16)
    assert not (soft_vectors.unsqueeze(1) == codebook.unsqueeze(0)).all(dim=-1).any()
