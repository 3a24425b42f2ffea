"""Shared fixtures: tiny configs, a fixed batch of synthetic images, and models trained once per session."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch

from dalle_vae import DiscreteVAE, DiscreteVAEConfig

TINY = DiscreteVAEConfig(
    image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=16, channels=3, num_resnet_blocks=1
)
TRAIN_STEPS = 150


def make_squares(count: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Dark random backgrounds, each with a bright 8x8 square at a random position on the 4-pixel grid."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.empty(count, 3, size, size)
    for index in range(count):
        background = torch.rand(3, generator=generator) * 0.3
        foreground = 0.5 + torch.rand(3, generator=generator) * 0.5
        images[index] = background.view(3, 1, 1)
        left, top = (torch.randint(0, (size - 8) // 4 + 1, (2,), generator=generator) * 4).tolist()
        images[index, :, top : top + 8, left : left + 8] = foreground.view(3, 1, 1)
    return images


def tiny_model(seed: int = 0, **overrides: object) -> DiscreteVAE:
    torch.manual_seed(seed)
    return DiscreteVAE(dataclasses.replace(TINY, **overrides)).eval()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny convolutions run fastest on one thread, and far faster than on 2 when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with single_thread():
        yield


def train(model: DiscreteVAE, images: torch.Tensor, steps: int = TRAIN_STEPS) -> list[float]:
    """Adam on one fixed batch; returns the reconstruction loss of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    history = []
    with single_thread():
        for _ in range(steps):
            result = model.loss(images, generator=generator)
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            history.append(result.reconstruction_loss.item())
    model.eval()
    return history


@pytest.fixture(scope="session")
def squares() -> torch.Tensor:
    return make_squares()


@pytest.fixture(scope="session")
def trained(squares: torch.Tensor) -> tuple[DiscreteVAE, list[float]]:
    model = tiny_model(seed=0, hidden_dim=32, codebook_dim=32)
    return model, train(model, squares)


@pytest.fixture(scope="session")
def trained_normalized(squares: torch.Tensor) -> tuple[DiscreteVAE, list[float]]:
    model = tiny_model(seed=0, hidden_dim=32, codebook_dim=32, normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    return model, train(model, squares)


@pytest.fixture
def make_model() -> Callable[..., DiscreteVAE]:
    return tiny_model
