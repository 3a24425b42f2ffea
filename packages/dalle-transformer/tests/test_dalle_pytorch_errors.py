"""What the DALLE-pytorch import refuses, each with a CheckpointError naming the cause."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_dalle_pytorch_reference import Spec, write_weights

from dalle_core.errors import CheckpointError, ConfigError
from dalle_transformer import config_from_dalle_pytorch, convert_dalle_pytorch_weights

BASE = dict(dim=32, depth=2, heads=2, dim_head=16, num_text_tokens=30, text_seq_len=5)


def convert(weights: dict, hparams: dict | None = None, fmap: int = 4, image_tokens: int = 20) -> dict:
    config = config_from_dalle_pytorch(hparams or BASE, fmap, image_tokens)
    return convert_dalle_pytorch_weights(weights, config)


def test_unexpected_and_missing_weights_are_named() -> None:
    weights = write_weights(Spec(dict(BASE)))
    weights["transformer.layers.layers.2.0.scale"] = torch.ones(1, 1, 32)
    del weights["to_logits.0.bias"]
    with pytest.raises(CheckpointError, match=r"missing to_logits\.0\.bias.*unexpected transformer\.layers\.layers\.2"):
        convert(weights)


def test_a_deeper_checkpoint_than_its_hparams_is_refused() -> None:
    weights = write_weights(Spec({**BASE, "depth": 3}))
    with pytest.raises(CheckpointError, match=r"unexpected transformer\.layers\.layers\.2\."):
        convert(weights)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("image_emb.weight", (21, 32), r"\[20, 32\]"),
        ("text_pos_emb.weight", (5, 32), r"\[6, 32\]"),
        ("image_pos_emb.weights.0", (1, 5, 1, 32), r"\[1, 4, 1, 32\]"),
        ("transformer.layers.layers.0.0.scale", (32,), r"\[1, 1, 32\]"),
    ],
)
def test_mis_shaped_weights_are_named(name: str, shape: tuple[int, ...], expected: str) -> None:
    weights = write_weights(Spec(dict(BASE)))
    weights[name] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=rf"{name} has shape .* expected {expected}"):
        convert(weights)


def test_text_embedding_without_padding_rows_is_explained() -> None:
    """Before 0.9 DALLE-pytorch had num_text_tokens rows (padding masked, no padding ids)."""
    weights = write_weights(Spec(dict(BASE)))
    weights["text_emb.weight"] = weights["text_emb.weight"][:30]
    with pytest.raises(CheckpointError, match="before DALLE-pytorch 0.9 masked text padding"):
        convert(weights)


def test_shared_copies_must_be_the_same_tensor() -> None:
    hparams = {**BASE, "shared_attn_ids": (0, 0)}
    weights = write_weights(Spec(hparams))
    name = "transformer.layers.layers.1.0.fn.fn.fn.to_qkv.weight"
    weights[name] = weights[name] + 1
    with pytest.raises(CheckpointError, match=rf"{name} should be the same tensor as transformer\.layers\.layers\.0\."):
        convert(weights, hparams)


def test_weights_disagreeing_with_the_hparams_say_which_option() -> None:
    """A checkpoint whose hparams lack shift_tokens (read as False) but whose weights have token shifting."""
    weights = write_weights(Spec({**BASE, "shift_tokens": True}))
    with pytest.raises(CheckpointError, match="weights are those of shift_tokens=True but the hparams give False"):
        convert(weights)
    weights = write_weights(Spec({**BASE, "rotary_emb": True}))
    with pytest.raises(CheckpointError, match="rotary_emb=True"):
        convert(weights)


def test_a_rotary_table_unlike_ours_is_refused() -> None:
    hparams = {**BASE, "rotary_emb": True}
    weights = write_weights(Spec(hparams))
    weights["transformer.pos_emb"] = weights["transformer.pos_emb"] * 1.01
    with pytest.raises(CheckpointError, match="rotary angles in transformer.pos_emb differ"):
        convert(weights, hparams)
    weights["transformer.pos_emb"] = torch.zeros(1, 23, 12)
    with pytest.raises(CheckpointError, match=r"transformer.pos_emb has shape \[1, 23, 12\], expected \[1, 22, 12\]"):
        convert(weights, hparams)


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"attn_types": ("full", "sparse")}, "DeepSpeed's block-sparse attention"),
        ({"attn_types": "mlp"}, "attn_types 'mlp' cannot be imported"),
        ({"attn_types": 3}, "attn_types must be a name or a list of names"),
        ({"vae": None}, r"unknown DALLE-pytorch DALLE argument\(s\) \['vae'\]"),
        ({"heads": 0}, "heads: expected a positive integer"),
        ({"loss_img_weight": "7"}, "loss_img_weight must be a number"),
        ({"shared_attn_ids": "0,0"}, "shared_attn_ids must be a list of layer ids"),
        ({"shift_tokens": "yes"}, "shift_tokens: expected true or false"),
        ({"rotary_emb": True, "dim_head": 4}, "dim_head"),
    ],
)
def test_bad_hparams_are_named(hparams: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        config_from_dalle_pytorch({**BASE, **hparams}, 4, 20)


def test_dim_and_depth_are_required() -> None:
    with pytest.raises(CheckpointError, match=r"missing required DALLE argument\(s\) \['depth'\]"):
        config_from_dalle_pytorch({"dim": 32}, 4, 20)
    with pytest.raises(CheckpointError, match="expected a mapping"):
        config_from_dalle_pytorch([("dim", 32)], 4, 20)  # type: ignore[arg-type]


@pytest.mark.parametrize(("version", "importable"), [(None, False), ("1.4.2", False), ("1.5.0", True), ("1.6.6", True)])
def test_conv_like_needs_dalle_pytorch_1_5(version: str | None, importable: bool) -> None:
    """Before 1.5 its conv-like window was centred on the query: another pattern, refused."""
    hparams = {**BASE, "attn_types": ("full", "conv_like")}
    if importable:
        assert config_from_dalle_pytorch(hparams, 4, 20, version=version).attn_types == ("full", "conv_like")
    else:
        with pytest.raises(CheckpointError, match="centred 5x5 window"):
            config_from_dalle_pytorch(hparams, 4, 20, version=version)
    # Other attention types do not depend on the version.
    assert config_from_dalle_pytorch({**BASE, "attn_types": ("axial_row",)}, 4, 20, version=version)


def test_unreadable_version_with_conv_like() -> None:
    with pytest.raises(CheckpointError, match="cannot read DALLE-pytorch version 'dev'"):
        config_from_dalle_pytorch({**BASE, "attn_types": "conv_like"}, 4, 20, version="dev")


def test_entries_must_be_named_tensors() -> None:
    weights = write_weights(Spec(dict(BASE)))
    weights["to_logits.0.bias"] = [0.0] * 32  # type: ignore[assignment]
    with pytest.raises(CheckpointError, match=r"entry 'to_logits\.0\.bias' is not a named tensor \(list\)"):
        convert(weights)


def test_configs_not_made_for_dalle_pytorch_are_refused() -> None:
    config = config_from_dalle_pytorch(BASE, 4, 20)
    with pytest.raises(ConfigError, match="layer_scale=False"):
        convert_dalle_pytorch_weights(write_weights(Spec(dict(BASE))), dataclasses.replace(config, layer_scale=False))
