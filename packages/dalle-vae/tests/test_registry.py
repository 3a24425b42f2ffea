"""The ``dalle.image_tokenizers`` registry: our entry points, and a third-party tokenizer plugging in."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dalle_core import ImageTokenizer, ShapeError, VocabularyError, registry
from dalle_core.testing import ImageTokenizerContract
from dalle_vae import DiscreteVAE, OpenAIDiscreteVAE, VQGanVAE

README = Path(__file__).resolve().parents[1] / "README.md"


def test_entry_points_name_every_tokenizer() -> None:
    names = registry.available(registry.IMAGE_TOKENIZERS)
    for name, cls in (("discrete_vae", DiscreteVAE), ("openai_dvae", OpenAIDiscreteVAE), ("vqgan", VQGanVAE)):
        assert name in names and name not in registry._extra[registry.IMAGE_TOKENIZERS]  # installed, not run-time
        assert registry.resolve(registry.IMAGE_TOKENIZERS, name) is cls
        assert cls.kind == name


class GrayLevels:
    """A third party's image tokenizer: the mean gray level of each 4x4 patch, in ``levels`` steps.

    It imports nothing from dalle_vae: the ImageTokenizer protocol is structural.
    """

    kind = "gray_levels"
    patch = 4

    def __init__(self, image_size: int = 8, levels: int = 16) -> None:
        self.image_size, self.levels = image_size, levels
        self.channels, self.num_tokens = 3, levels
        self.fmap_size = image_size // self.patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ShapeError(f"expected images [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}")
        gray = torch.nn.functional.avg_pool2d(images.mean(dim=1, keepdim=True), self.patch)
        return (gray * self.levels).long().clamp(0, self.levels - 1).flatten(1)

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.fmap_size**2:
            raise ShapeError(f"expected ids [B, {self.fmap_size**2}], got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tokens):
            raise VocabularyError(f"ids must be in [0, num_tokens={self.num_tokens})")
        gray = (ids.float() + 0.5) / self.levels
        grid = gray.view(-1, 1, self.fmap_size, self.fmap_size).expand(-1, 3, -1, -1)
        return grid.repeat_interleave(self.patch, dim=2).repeat_interleave(self.patch, dim=3).contiguous()

    def save(self, directory: Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        spec = {"kind": self.kind, "image_size": self.image_size, "levels": self.levels}
        (Path(directory) / "spec.json").write_text(json.dumps(spec))

    @classmethod
    def load(cls, directory: Path) -> GrayLevels:
        spec = json.loads((Path(directory) / "spec.json").read_text())
        return cls(spec["image_size"], spec["levels"])


@pytest.fixture
def gray_levels_registered() -> Iterator[None]:
    # What an installed package gets from its entry point; register() is the run-time (test, notebook) equivalent.
    registry.register(registry.IMAGE_TOKENIZERS, "gray_levels", GrayLevels)
    try:
        yield
    finally:
        registry._extra[registry.IMAGE_TOKENIZERS].pop("gray_levels", None)


def test_third_party_tokenizer_registers_and_loads(tmp_path: Path, gray_levels_registered: None) -> None:
    assert "gray_levels" in registry.available(registry.IMAGE_TOKENIZERS)
    tokenizer = GrayLevels(image_size=16, levels=8)
    assert isinstance(tokenizer, ImageTokenizer)
    tokenizer.save(tmp_path / "tokenizer")
    loaded = registry.load_image_tokenizer(tmp_path / "tokenizer")
    assert isinstance(loaded, GrayLevels) and (loaded.image_size, loaded.levels) == (16, 8)
    images = torch.zeros(1, 3, 16, 16)
    images[:, :, :4, :4] = 1.0  # one white patch in the top-left corner
    assert loaded.encode(images).tolist() == [[7] + [0] * 15]


@pytest.mark.usefixtures("gray_levels_registered")
class TestGrayLevelsContract(ImageTokenizerContract):
    def make_image_tokenizer(self) -> ImageTokenizer:
        return GrayLevels()


def test_readme_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block in the README runs as written (they use only tiny models and temporary files)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 2  # the DiscreteVAE walk-through and the third-party tokenizer
    monkeypatch.chdir(tmp_path)
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"README.md block {index}", "exec"), {"__name__": f"readme_block_{index}"})
        finally:
            registry._extra[registry.IMAGE_TOKENIZERS].pop("gray_levels", None)
