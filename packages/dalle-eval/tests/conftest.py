from __future__ import annotations

import pytest
import torch

from dalle_tokenizers import SimpleTokenizer
from dalle_train.bundle import Bundle, load_bundle, save_bundle
from dalle_transformer import DALLE, DALLEConfig
from dalle_vae import DiscreteVAE, DiscreteVAEConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one thread each keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_bundle_dir(root, image_size: int = 16, num_layers: int = 2, seed: int = 0):
    """A random-weight bundle on disk: DiscreteVAE (16 codes, 4x4 grid), SimpleTokenizer, 1-layer DALLE."""
    torch.manual_seed(seed)
    vae = DiscreteVAE(
        DiscreteVAEConfig(image_size=image_size, num_layers=num_layers, num_tokens=16, codebook_dim=8, hidden_dim=8)
    )
    config = DALLEConfig(
        num_text_tokens=257,
        text_seq_len=48,
        num_image_tokens=16,
        image_fmap_size=vae.fmap_size,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
    )
    save_bundle(root / "model", DALLE(config), SimpleTokenizer(), vae.eval())
    return root / "model"


@pytest.fixture
def make_bundle_dir():
    """:func:`tiny_bundle_dir` (a fixture, so tests need not import this conftest)."""
    return tiny_bundle_dir


@pytest.fixture
def bundle_dir(tmp_path):
    return tiny_bundle_dir(tmp_path)


@pytest.fixture
def bundle(bundle_dir) -> Bundle:
    return load_bundle(bundle_dir)


class TinyFeatures(torch.nn.Module):
    """A small random-weight CNN standing in for the FID Inception (same interface: images in [0, 1] -> [B, D])."""

    num_features = 12

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, self.num_features, 3, stride=2)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(images.float()))
        return torch.tanh(self.conv2(x)).mean(dim=(2, 3))


@pytest.fixture
def tiny_features():
    """Build :class:`TinyFeatures` (a fixture, so tests need not import this conftest)."""
    return TinyFeatures
