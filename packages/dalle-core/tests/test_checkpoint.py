from __future__ import annotations

import os

import pytest
import torch

from dalle_core.checkpoint import atomic_directory, load_weights, read_json, save_model_dir
from dalle_core.errors import CheckpointError


def test_save_and_load_model_dir(tmp_path):
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_model_dir(tmp_path / "ckpt", state, {"dim": 4})
    config, loaded = load_weights(tmp_path / "ckpt")
    assert config == {"dim": 4}
    assert set(loaded) == set(state)
    assert torch.equal(loaded["a.weight"], state["a.weight"]) and loaded["b"].dtype == torch.int64
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], "no temporary directories may be left behind"


def test_tied_weights_are_saved(tmp_path):
    shared = torch.nn.Parameter(torch.randn(3, 2))
    save_model_dir(tmp_path / "ckpt", {"x": shared, "y": shared}, {})
    _, loaded = load_weights(tmp_path / "ckpt")
    assert torch.equal(loaded["x"], loaded["y"])


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    target = tmp_path / "ckpt"
    save_model_dir(target, {"w": torch.ones(2)}, {"version": 1})
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("crash while writing")
    config, state = load_weights(target)
    assert config == {"version": 1} and torch.equal(state["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_overwrite_replaces_whole_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as staging:
        (staging / "stale.txt").write_text("old")
    save_model_dir(target, {"w": torch.zeros(1)}, {"version": 2})
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


def test_missing_or_broken_checkpoints_raise(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_weights(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"expected model\.safetensors"):
        load_weights(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        read_json(tmp_path / "bad.json")
