"""save/load through files and through the registry entry point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dalle_core import CheckpointError, registry
from dalle_core.checkpoint import load_weights, save_weights
from dalle_vae import DiscreteVAE


def _trained_a_little(make_model: Callable[..., DiscreteVAE], **overrides: object) -> DiscreteVAE:
    """A model whose weights differ from any fresh initialisation (one optimiser step)."""
    model = make_model(seed=3, **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))).loss.backward()
    optimizer.step()
    return model.train()


def test_save_writes_expected_files(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    model = make_model(normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    model.save(tmp_path / "vae")
    assert sorted(p.name for p in (tmp_path / "vae").iterdir()) == ["config.json", "model.safetensors", "spec.json"]
    assert json.loads((tmp_path / "vae" / "spec.json").read_text()) == {"kind": "discrete_vae"}
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["num_tokens"] == 32 and config["normalization"] == [[0.5] * 3, [0.5] * 3]
    assert set(load_file(str(tmp_path / "vae" / "model.safetensors"))) == set(model.state_dict())
    assert "norm_mean" not in model.state_dict()  # derived from the config, not stored
    assert [p.name for p in tmp_path.iterdir()] == ["vae"]  # no staging directories left behind


def test_load_restores_identical_model(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    model = _trained_a_little(make_model, normalization=((0.4, 0.5, 0.6), (0.2, 0.3, 0.4)))
    model.save(tmp_path / "vae")
    loaded = DiscreteVAE.load(tmp_path / "vae")
    assert not loaded.training
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[key], loaded_state[key]) for key in state)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids = model.encode(images)
    assert torch.equal(loaded.encode(images), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    assert torch.equal(loaded.logits(images), model.logits(images))
    first = model.loss(images, generator=torch.Generator().manual_seed(2))
    second = loaded.loss(images, generator=torch.Generator().manual_seed(2))
    assert first.loss.item() == second.loss.item()


def test_save_replaces_existing_checkpoint(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    make_model(seed=1).save(tmp_path / "vae")
    newer = make_model(seed=2)
    newer.save(tmp_path / "vae")
    loaded = DiscreteVAE.load(tmp_path / "vae")
    assert torch.equal(loaded.codebook.weight, newer.codebook.weight)


def test_registry_loads_through_entry_point(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    assert "discrete_vae" in registry.available(registry.IMAGE_TOKENIZERS)
    assert "discrete_vae" not in registry._extra[registry.IMAGE_TOKENIZERS]  # really the installed entry point
    assert registry.resolve(registry.IMAGE_TOKENIZERS, "discrete_vae") is DiscreteVAE
    model = _trained_a_little(make_model)
    model.save(tmp_path / "vae")
    loaded = registry.load_image_tokenizer(tmp_path / "vae")
    assert isinstance(loaded, DiscreteVAE)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(ids), model.decode(ids))


def _rewrite_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    config, state = load_weights(directory)
    edit(state)
    save_weights(directory, state, config)


def test_missing_key_raises(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    make_model().save(tmp_path / "vae")
    _rewrite_weights(tmp_path / "vae", lambda state: state.pop("codebook.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys codebook\.weight") as info:
        DiscreteVAE.load(tmp_path / "vae")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match=r"codebook\.weight"):
        registry.load_image_tokenizer(tmp_path / "vae")


def test_unexpected_key_raises(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    make_model().save(tmp_path / "vae")
    _rewrite_weights(tmp_path / "vae", lambda state: state.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"missing keys none, unexpected keys extra\.weight"):
        DiscreteVAE.load(tmp_path / "vae")


def test_wrong_shape_raises(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    make_model().save(tmp_path / "vae")
    _rewrite_weights(tmp_path / "vae", lambda state: state.__setitem__("codebook.weight", torch.zeros(8, 16)))
    with pytest.raises(CheckpointError, match=r"codebook\.weight has shape \(8, 16\), expected \(32, 16\)"):
        DiscreteVAE.load(tmp_path / "vae")


def test_bad_config_and_kind_and_missing_files_raise(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    directory = tmp_path / "vae"
    make_model().save(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "image_size": 18}))
    with pytest.raises(CheckpointError, match=r"config\.json: image_size must be divisible"):
        DiscreteVAE.load(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "spec.json").write_text(json.dumps({"kind": "vqgan"}))
    with pytest.raises(CheckpointError, match="expected kind 'discrete_vae', got 'vqgan'"):
        DiscreteVAE.load(directory)
    (directory / "spec.json").write_text(json.dumps({"kind": "discrete_vae"}))
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        DiscreteVAE.load(directory)
    with pytest.raises(CheckpointError, match="not found"):
        DiscreteVAE.load(tmp_path / "nowhere")


def test_loads_weights_saved_without_spec(tmp_path: Path, make_model: Callable[..., DiscreteVAE]) -> None:
    """A bare config.json + model.safetensors directory (dalle_core.checkpoint.save_model_dir) also loads."""
    model = make_model()
    (tmp_path / "bare").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare" / "model.safetensors"))
    (tmp_path / "bare" / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = DiscreteVAE.load(tmp_path / "bare")
    assert torch.equal(loaded.codebook.weight, model.codebook.weight)
