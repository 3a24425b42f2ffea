"""DiscreteVAEConfig validation and (de)serialisation."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_core import ConfigError
from dalle_core.config import from_dict, to_dict
from dalle_vae import DiscreteVAE, DiscreteVAEConfig


def test_defaults() -> None:
    config = DiscreteVAEConfig()
    assert (config.image_size, config.num_layers, config.num_tokens, config.codebook_dim, config.hidden_dim) == (
        32,
        2,
        128,
        64,
        64,
    )
    assert (config.channels, config.num_resnet_blocks, config.temperature) == (3, 1, 0.9)
    assert (config.straight_through, config.kl_div_loss_weight, config.smooth_l1_loss) == (False, 0.0, False)
    assert config.normalization is None and config.fmap_size == 8
    assert (config.reinmax, config.decoder_input_conv) == (False, True)


@pytest.mark.parametrize(
    ("overrides", "field", "detail"),
    [
        ({"image_size": 30}, "image_size", "divisible by 2**num_layers=4, got 30"),
        ({"image_size": 32, "num_layers": 6}, "image_size", "2**num_layers=64"),
        ({"image_size": 0}, "image_size", ">= 1"),
        ({"num_layers": 0}, "num_layers", ">= 1, got 0"),
        ({"num_tokens": 1}, "num_tokens", ">= 2, got 1"),
        ({"num_tokens": 12.0}, "num_tokens", "integer"),
        ({"codebook_dim": -4}, "codebook_dim", ">= 1"),
        ({"hidden_dim": True}, "hidden_dim", "integer"),
        ({"channels": 0}, "channels", ">= 1"),
        ({"num_resnet_blocks": -1}, "num_resnet_blocks", ">= 0"),
        ({"temperature": 0.0}, "temperature", "> 0"),
        ({"temperature": float("inf")}, "temperature", "finite"),
        ({"kl_div_loss_weight": -0.5}, "kl_div_loss_weight", ">= 0"),
        ({"straight_through": 1}, "straight_through", "true or false"),
        ({"smooth_l1_loss": "yes"}, "smooth_l1_loss", "true or false"),
        ({"normalization": ((0.5,) * 3,)}, "normalization", "pair"),
        ({"normalization": ((0.5, 0.5), (0.5, 0.5))}, "normalization", "per channel (3)"),
        ({"normalization": ((0.5,) * 3, (0.5, 0.0, 0.5))}, "normalization", "> 0"),
        ({"normalization": ((0.5,) * 3, (0.5, float("nan"), 0.5))}, "normalization", "finite"),
        ({"reinmax": True}, "reinmax", "straight_through=true"),
        ({"reinmax": 1, "straight_through": True}, "reinmax", "true or false"),
        ({"decoder_input_conv": False, "num_resnet_blocks": 1}, "decoder_input_conv", "num_resnet_blocks=0"),
        ({"decoder_input_conv": "no"}, "decoder_input_conv", "true or false"),
    ],
)
def test_invalid_values_raise_one_line_naming_the_field(overrides: dict, field: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        DiscreteVAEConfig(**overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(field) and detail in message, message


def test_exact_divisibility_message() -> None:
    with pytest.raises(ConfigError, match=r"^image_size must be divisible by 2\*\*num_layers=4, got 30$"):
        DiscreteVAEConfig(image_size=30)


def test_dict_round_trip_is_json_ready() -> None:
    config = DiscreteVAEConfig(
        image_size=64, num_layers=3, num_tokens=512, normalization=([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    )
    assert config.normalization == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))  # coerced to tuples: hashable, frozen
    hash(config)
    data = json.loads(json.dumps(to_dict(config)))
    assert data["normalization"] == [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    assert from_dict(DiscreteVAEConfig, data) == config
    assert DiscreteVAEConfig.from_dict(config.to_dict()) == config


def test_from_dict_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="num_tokenz"):
        DiscreteVAEConfig.from_dict({"num_tokenz": 3})
    with pytest.raises(ConfigError, match=r"^temperature"):
        DiscreteVAEConfig.from_dict({"temperature": "hot"})
    with pytest.raises(ConfigError, match=r"^image_size must be divisible"):
        DiscreteVAEConfig.from_dict({"image_size": 20, "num_layers": 3})


def test_model_rejects_non_config() -> None:
    with pytest.raises(ConfigError, match="DiscreteVAEConfig"):
        DiscreteVAE({"image_size": 16})  # type: ignore[arg-type]


@pytest.mark.parametrize(("num_layers", "num_resnet_blocks", "channels"), [(1, 0, 1), (3, 2, 3)])
def test_architecture_shapes(num_layers: int, num_resnet_blocks: int, channels: int) -> None:
    config = DiscreteVAEConfig(
        image_size=16,
        num_layers=num_layers,
        num_tokens=8,
        codebook_dim=4,
        hidden_dim=8,
        channels=channels,
        num_resnet_blocks=num_resnet_blocks,
    )
    model = DiscreteVAE(config)
    fmap = 16 // 2**num_layers
    assert model.fmap_size == fmap
    images = torch.rand(2, channels, 16, 16)
    assert model.logits(images).shape == (2, 8, fmap, fmap)
    assert model.encode(images).shape == (2, fmap * fmap)
    assert model.decode(model.encode(images)).shape == (2, channels, 16, 16)
    strided = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    transposed = [m for m in model.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(strided) == len(transposed) == num_layers
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm)) for m in model.modules())


@pytest.mark.parametrize("decoder_input_conv", [True, False])
def test_decoder_input_conv_layout(decoder_input_conv: bool) -> None:
    config = DiscreteVAEConfig(
        image_size=16,
        num_tokens=8,
        codebook_dim=6,
        hidden_dim=10,
        num_resnet_blocks=0,
        decoder_input_conv=decoder_input_conv,
    )
    first = DiscreteVAE(config).decoder[0]
    if decoder_input_conv:
        assert isinstance(first, torch.nn.Conv2d) and first.kernel_size == (1, 1)
        assert (first.in_channels, first.out_channels) == (6, 10)
    else:  # the first transposed conv reads the codebook vectors directly, as in DALLE-pytorch without resnet blocks
        assert isinstance(first, torch.nn.ConvTranspose2d) and (first.in_channels, first.out_channels) == (6, 10)
    model = DiscreteVAE(config)
    assert model.decode(torch.zeros(2, 16, dtype=torch.long)).shape == (2, 3, 16, 16)
