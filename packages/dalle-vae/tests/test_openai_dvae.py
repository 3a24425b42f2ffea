"""OpenAI's dVAE: loading dall_e pickles without running them, and the tokenizer contract.

The pickles here are written from stand-in ``dall_e`` classes defined in this file (registered in ``sys.modules`` only
while saving) with dall_e's attribute layout and a naive forward, since the ``dall-e`` package is only an extra (see
test_openai_parity.py for the same checks against the real package).
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dalle_core import CheckpointError, ConfigError, ImageTokenizer, registry
from dalle_core.testing import ImageTokenizerContract
from dalle_vae import OpenAIDiscreteVAE, OpenAIDVAEConfig
from dalle_vae.openai_dvae import map_pixels, unmap_pixels

SETSTATE_CALLS: list[str] = []


class Conv2d(nn.Module):
    def __init__(self, n_in: int, n_out: int, kw: int, generator: torch.Generator) -> None:
        super().__init__()
        self.n_in, self.n_out, self.kw = n_in, n_out, kw
        self.use_float16, self.device, self.requires_grad = True, torch.device("cpu"), False
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw, generator=generator) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.randn(n_out, generator=generator) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)

    def __setstate__(self, state: dict) -> None:  # only a loader that runs the file's classes calls this
        SETSTATE_CALLS.append("Conv2d")
        super().__setstate__(state)


class Block(nn.Module):
    """dall_e's EncoderBlock / DecoderBlock: identity or 1x1 conv, plus a gained 4-conv residual path."""

    kernels: tuple[int, ...] = ()

    def __init__(self, n_in: int, n_out: int, n_layers: int, generator: torch.Generator) -> None:
        super().__init__()
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        self.device, self.requires_grad = None, False
        self.n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1, generator) if n_in != n_out else nn.Identity()
        widths = [n_in, self.n_hid, self.n_hid, self.n_hid, n_out]
        layers = OrderedDict()
        for i, kernel in enumerate(self.kernels):
            layers[f"relu_{i + 1}"] = nn.ReLU()
            layers[f"conv_{i + 1}"] = Conv2d(widths[i], widths[i + 1], kernel, generator)
        self.res_path = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class EncoderBlock(Block):
    kernels = (3, 3, 3, 1)


class DecoderBlock(Block):
    kernels = (1, 3, 3, 3)


class Encoder(nn.Module):
    def __init__(self, n_hid: int, n_blk_per_group: int, input_channels: int, vocab_size: int, seed: int = 0) -> None:
        super().__init__()
        self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = (
            n_hid,
            n_blk_per_group,
            input_channels,
            vocab_size,
        )
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        generator = torch.Generator().manual_seed(seed)
        n_layers = 4 * n_blk_per_group
        groups: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(input_channels, n_hid, 7, generator))
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        for g in range(1, 5):
            blocks = OrderedDict()
            for i in range(n_blk_per_group):
                n_in = widths[g - 1] if i == 0 else widths[g]
                blocks[f"block_{i + 1}"] = EncoderBlock(n_in, widths[g], n_layers, generator)
            if g < 4:
                blocks["pool"] = nn.MaxPool2d(kernel_size=2)
            groups[f"group_{g}"] = nn.Sequential(blocks)
        groups["output"] = nn.Sequential(OrderedDict(relu=nn.ReLU(), conv=Conv2d(8 * n_hid, vocab_size, 1, generator)))
        self.blocks = nn.Sequential(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, n_init: int, n_hid: int, n_blk_per_group: int, output_channels: int, vocab_size: int) -> None:
        super().__init__()
        self.n_init, self.n_hid, self.n_blk_per_group = n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
        generator = torch.Generator().manual_seed(1)
        n_layers = 4 * n_blk_per_group
        groups: OrderedDict[str, nn.Module] = OrderedDict(input=Conv2d(vocab_size, n_init, 1, generator))
        widths = [n_init, 8 * n_hid, 4 * n_hid, 2 * n_hid, n_hid]
        for g in range(1, 5):
            blocks = OrderedDict()
            for i in range(n_blk_per_group):
                n_in = widths[g - 1] if i == 0 else widths[g]
                blocks[f"block_{i + 1}"] = DecoderBlock(n_in, widths[g], n_layers, generator)
            if g < 4:
                blocks["upsample"] = nn.Upsample(scale_factor=2, mode="nearest")
            groups[f"group_{g}"] = nn.Sequential(blocks)
        groups["output"] = nn.Sequential(
            OrderedDict(relu=nn.ReLU(), conv=Conv2d(n_hid, 2 * output_channels, 1, generator))
        )
        self.blocks = nn.Sequential(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


FAKE_MODULES = {
    "dall_e.utils": {"Conv2d": Conv2d},
    "dall_e.encoder": {"Encoder": Encoder, "EncoderBlock": EncoderBlock},
    "dall_e.decoder": {"Decoder": Decoder, "DecoderBlock": DecoderBlock},
}


@contextmanager
def dall_e_importable() -> Iterator[None]:
    """Make the classes above pickle as dall_e's (module + qualname), only for the duration of a save."""
    saved = {name: sys.modules.get(name) for name in ["dall_e", *FAKE_MODULES]}
    try:
        sys.modules["dall_e"] = types.ModuleType("dall_e")
        for module_name, classes in FAKE_MODULES.items():
            module = types.ModuleType(module_name)
            for class_name, cls in classes.items():
                cls.__module__, cls.__qualname__ = module_name, class_name
                setattr(module, class_name, cls)
            sys.modules[module_name] = module
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


TINY = dict(n_hid=8, n_blk_per_group=1, vocab_size=40)


def write_pickles(directory: Path, zip_format: bool = True, **overrides: int) -> tuple[Encoder, Decoder]:
    params = {**TINY, **overrides}
    encoder = Encoder(params["n_hid"], params["n_blk_per_group"], 3, params["vocab_size"]).eval()
    decoder = Decoder(6, params["n_hid"], params["n_blk_per_group"], 3, params["vocab_size"]).eval()
    directory.mkdir(parents=True, exist_ok=True)
    with dall_e_importable(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy format warns that it cannot find these classes' source
        torch.save(encoder, directory / "encoder.pkl", _use_new_zipfile_serialization=zip_format)
        torch.save(decoder, directory / "decoder.pkl", _use_new_zipfile_serialization=zip_format)
    return encoder, decoder


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_loaded_dvae_matches_reference(tmp_path: Path, zip_format: bool) -> None:
    encoder, decoder = write_pickles(tmp_path, zip_format)
    SETSTATE_CALLS.clear()
    modules_before = set(sys.modules)
    model = OpenAIDiscreteVAE.from_openai_pickles(tmp_path, image_size=16)
    assert SETSTATE_CALLS == []  # the pickled classes never ran...
    assert not [name for name in set(sys.modules) - modules_before if "dall_e" in name]  # ...nor were imported
    config = model.config
    assert (config.encoder_hidden, config.encoder_blocks_per_group, config.vocab_size, config.channels) == (8, 1, 40, 3)
    assert (config.decoder_init, config.decoder_hidden, config.decoder_blocks_per_group) == (6, 8, 1)
    assert (model.num_tokens, model.fmap_size, model.image_size) == (40, 2, 16)

    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # DALLE-pytorch: map_pixels (0.8 x + 0.1), encoder, argmax over codes, row-major.
        expected_ids = encoder(0.8 * images + 0.1).argmax(dim=1).flatten(1)
        ids = model.encode(images)
        assert torch.equal(ids, expected_ids)
        # DALLE-pytorch: one-hot codes, decoder, sigmoid of the first 3 channels, unmap_pixels.
        one_hot = F.one_hot(ids.view(4, 2, 2), 40).permute(0, 3, 1, 2).float()
        expected = torch.clamp((torch.sigmoid(decoder(one_hot)[:, :3]) - 0.1) / 0.8, 0, 1)
    decoded = model.decode(ids)
    assert torch.allclose(decoded, expected, atol=1e-6)
    assert decoded.std() > 1e-3


def test_explicit_paths_and_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_pickles(tmp_path / "cache")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "cache" / "decoder.pkl").rename(tmp_path / "elsewhere" / "dec.pkl")
    model = OpenAIDiscreteVAE.from_openai_pickles(
        tmp_path / "cache" / "encoder.pkl", decoder=tmp_path / "elsewhere" / "dec.pkl", image_size=8
    )
    assert model.fmap_size == 1
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(CheckpointError) as info:
        OpenAIDiscreteVAE.from_openai_pickles()
    message = str(info.value)
    assert len(message.splitlines()) == 1
    for part in ("empty/encoder.pkl", "empty/decoder.pkl", "https://cdn.openai.com/dall-e/encoder.pkl", "decoder.pkl"):
        assert part in message, message
    with pytest.raises(CheckpointError, match=r"not found: .*cache/decoder\.pkl"):
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path / "cache")


def test_pickles_with_foreign_code_are_refused(tmp_path: Path) -> None:
    write_pickles(tmp_path)
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({"blocks": Payload()}, tmp_path / "encoder.pkl")
    # (pickle spells a bound method as getattr(obj, name): the first name it asks for is builtins.getattr)
    with pytest.raises(CheckpointError, match=r"refusing to load builtins\.getattr") as info:
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path)
    assert "encoder.pkl" in str(info.value) and "holds only dall_e and torch modules" in str(info.value)
    assert "trust_pickle" not in str(info.value)  # no such opt-in: a foreign pickle is never an OpenAI dVAE
    assert not marker.exists()


def test_swapped_or_mismatched_files_raise(tmp_path: Path) -> None:
    write_pickles(tmp_path)
    (tmp_path / "encoder.pkl").rename(tmp_path / "tmp.pkl")
    (tmp_path / "decoder.pkl").rename(tmp_path / "encoder.pkl")
    (tmp_path / "tmp.pkl").rename(tmp_path / "decoder.pkl")
    with pytest.raises(CheckpointError, match=r"expected a pickled dall_e\.encoder\.Encoder, found dall_e\.decoder"):
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path)

    write_pickles(tmp_path / "small")
    write_pickles(tmp_path / "large", vocab_size=48)
    with pytest.raises(CheckpointError, match="do not belong together.* 40 codes, decoder 3 channels and 48 codes"):
        OpenAIDiscreteVAE.from_openai_pickles(
            tmp_path / "small" / "encoder.pkl", decoder=tmp_path / "large" / "decoder.pkl"
        )


def test_architecture_is_checked_against_the_hyperparameters(tmp_path: Path) -> None:
    encoder, _ = write_pickles(tmp_path)
    encoder.n_blk_per_group = 2  # the attribute now promises two blocks per group, the modules hold one
    with dall_e_importable():
        torch.save(encoder, tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match=r"module blocks\.group_1\.block_2 is missing, expected dall_e") as info:
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path, image_size=16)
    assert len(str(info.value).splitlines()) == 1

    encoder.n_blk_per_group = 1
    with torch.no_grad():
        encoder.blocks.input.w = nn.Parameter(torch.zeros(8, 3, 5, 5))
    with dall_e_importable():
        torch.save(encoder, tmp_path / "encoder.pkl")
    with pytest.raises(CheckpointError, match=r"tensor blocks\.input\.weight has shape \(8, 3, 5, 5\), expected"):
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path, image_size=16)


def test_image_size_must_fit_the_downsampling(tmp_path: Path) -> None:
    write_pickles(tmp_path)
    with pytest.raises(CheckpointError, match="image_size must be divisible by 8, got 12"):
        OpenAIDiscreteVAE.from_openai_pickles(tmp_path, image_size=12)
    with pytest.raises(ConfigError, match="encoder_hidden must be a multiple of 4"):
        OpenAIDVAEConfig(encoder_hidden=10)


def test_pixel_maps() -> None:
    pixels = torch.tensor([0.0, 0.25, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(map_pixels(pixels).flatten(), torch.tensor([0.1, 0.3, 0.9]))
    assert torch.allclose(unmap_pixels(map_pixels(pixels)), pixels)
    assert unmap_pixels(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)).flatten().tolist() == [0.0, 1.0]  # clamped


def test_defaults_are_openais_released_model() -> None:
    config = OpenAIDVAEConfig()
    assert (config.vocab_size, config.image_size, config.fmap_size) == (8192, 256, 32)
    assert (config.encoder_hidden, config.decoder_init, config.decoder_hidden) == (256, 128, 256)


def test_saved_directory_reloads_through_the_registry(tmp_path: Path) -> None:
    write_pickles(tmp_path / "openai")
    model = OpenAIDiscreteVAE.from_openai_pickles(tmp_path / "openai", image_size=16)
    model.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["config.json", "model.safetensors", "spec.json"]
    loaded = registry.load_image_tokenizer(tmp_path / "saved")
    assert isinstance(loaded, OpenAIDiscreteVAE) and loaded.config == model.config
    ids = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded.decode(ids), model.decode(ids))


class TestOpenAIDVAEContract(ImageTokenizerContract):
    def make_image_tokenizer(self) -> ImageTokenizer:
        torch.manual_seed(0)
        config = OpenAIDVAEConfig(
            image_size=16,
            vocab_size=32,
            encoder_hidden=8,
            encoder_blocks_per_group=1,
            decoder_init=8,
            decoder_hidden=8,
            decoder_blocks_per_group=1,
        )
        return OpenAIDiscreteVAE(config)
