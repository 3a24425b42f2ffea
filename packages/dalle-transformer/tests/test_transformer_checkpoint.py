"""save/load: config.json + model.safetensors, strict keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_core import CheckpointError, ConfigError
from dalle_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE, read_json, write_json
from dalle_transformer import DALLE, DALLEConfig

CONFIG = DALLEConfig(
    num_text_tokens=10, text_seq_len=4, num_image_tokens=12, image_fmap_size=2, dim=16, depth=2, heads=2, dim_head=8
)


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[1, 2, 0, 0], [9, 8, 7, 6]]), torch.tensor([[0, 5, 11, 3], [4, 4, 2, 1]])


def saved_model(tmp_path: Path) -> tuple[DALLE, Path]:
    torch.manual_seed(0)
    model = DALLE(CONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    model.save(tmp_path / "ckpt", extra_config={"text_tokenizer": "simple", "steps": 3})
    return model, tmp_path / "ckpt"


def test_roundtrip_gives_identical_logits(tmp_path: Path) -> None:
    model, directory = saved_model(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    loaded = DALLE.load(directory).eval()
    assert loaded.config == CONFIG
    with torch.no_grad():
        a, b = model(*inputs()), loaded(*inputs())
    assert torch.equal(a.text_logits, b.text_logits) and torch.equal(a.image_logits, b.image_logits)
    assert DALLE.read_extra_config(directory) == {"text_tokenizer": "simple", "steps": 3}
    g = torch.Generator
    assert torch.equal(
        model.generate_image_ids(inputs()[0], generator=g().manual_seed(1)),
        loaded.generate_image_ids(inputs()[0], generator=g().manual_seed(1)),
    )
    # Saving again over an existing checkpoint replaces it.
    loaded.save(directory)
    assert DALLE.read_extra_config(directory) == {}


def test_missing_key_raises(tmp_path: Path) -> None:
    _, directory = saved_model(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    del tensors["blocks.1.attn.to_qkv.weight"]
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.1.attn.to_qkv.weight'\]"):
        DALLE.load(directory)


def test_unexpected_key_and_wrong_shape_raise(tmp_path: Path) -> None:
    _, directory = saved_model(tmp_path)
    tensors = load_file(str(directory / WEIGHTS_FILE))
    save_file({**tensors, "extra.weight": torch.zeros(2)}, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        DALLE.load(directory)
    tensors["image_emb.weight"] = torch.zeros(13, 16)
    save_file(tensors, str(directory / WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match=r"image_emb\.weight has shape"):
        DALLE.load(directory)


def test_not_a_dalle_checkpoint(tmp_path: Path) -> None:
    _, directory = saved_model(tmp_path)
    config = read_json(directory / CONFIG_FILE)
    write_json(directory / CONFIG_FILE, {**config, "format": "something-else"})
    with pytest.raises(CheckpointError, match="format"):
        DALLE.load(directory)
    with pytest.raises(CheckpointError):
        DALLE.load(tmp_path / "nowhere")


def test_write_files_keeps_the_rest_of_a_directory(tmp_path: Path) -> None:
    model, _ = saved_model(tmp_path)
    bundle = tmp_path / "bundle"
    (bundle / "text_tokenizer").mkdir(parents=True)
    (bundle / "text_tokenizer" / "spec.json").write_text("{}")
    model.write_files(bundle, {"k": 1})
    assert (bundle / "text_tokenizer" / "spec.json").is_file()
    loaded = DALLE.load(bundle)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in loaded.state_dict().items())
    with pytest.raises(ConfigError, match="extra_config"):
        model.write_files(bundle, {"bad": object()})
