"""Model options (DALLE-pytorch semantics) against the naive reference, and their training-time behaviour."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformer_naive import naive_logits

from dalle_core import ConfigError
from dalle_core.config import from_dict, to_dict
from dalle_transformer import DALLE, DALLEConfig

BASE = DALLEConfig(
    num_text_tokens=11,
    text_seq_len=4,
    num_image_tokens=13,
    image_fmap_size=3,
    text_pad_id=0,
    dim=16,
    depth=4,
    heads=2,
    dim_head=12,
    ff_mult=2,
    conv_kernel_size=3,
    sparse_block_size=2,
    sparse_local_blocks=2,
    sparse_stride=2,
)
OPTION_SETS = {
    "all types, rotary, shift, sandwich, layer scale, geglu": {
        "attn_types": ("full", "axial_row", "axial_col", "conv_like"),
        "rotary_emb": True,
        "shift_tokens": True,
        "sandwich_norm": True,
        "layer_scale": True,
        "ff_activation": "geglu",
    },
    "reversible, shared layers, shared embeddings, stable, sparse": {
        "attn_types": ("sparse", "full"),
        "reversible": True,
        "shared_attn_ids": (0, 1, 0, 1),
        "shared_ff_ids": (5, 5, 6),
        "share_input_output_emb": True,
        "stable": True,
        "dim": 18,  # shift chunks of uneven size: ceil(18 / 4) = 5
        "shift_tokens": True,
    },
    "gradient checkpointing, odd shapes": {
        "attn_types": ("axial_col", "conv_like"),
        "gradient_checkpointing": True,
        "rotary_emb": True,
        "dim_head": 14,
        "dim": 13,
        "shift_tokens": True,
        "conv_dilation": 2,
    },
}


def random_model(config: DALLEConfig, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    model = DALLE(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.4)
    return model


def inputs(config: DALLEConfig = BASE) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.tensor([[5, 7, 0, 0], [10, 0, 3, 1]])
    return text, torch.randint(0, config.num_image_tokens, (2, config.image_seq_len), generator=generator)


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_options_match_naive_reference(name: str) -> None:
    config = dataclasses.replace(BASE, **OPTION_SETS[name])
    model = random_model(config).double()
    text, image = inputs(config)
    with torch.no_grad():
        out = model(text, image)
        text_ref, image_ref = naive_logits(model, text, image)
    assert image_ref.abs().max() > 0.5
    torch.testing.assert_close(out.text_logits, text_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.image_logits, image_ref, rtol=1e-6, atol=1e-6)


def test_defaults_are_the_plain_model() -> None:
    config = BASE
    assert config.attn_types == ("full",) and not config.rotary_emb and not config.shift_tokens
    model = random_model(config)
    names = set(model.state_dict())
    assert {"text_pos_emb.weight", "image_row_emb.weight", "text_emb.weight", "blocks.3.attn.to_qkv.weight"} <= names
    assert not any("scale" in name or "out_norm" in name for name in names)


def test_shared_layers_are_stored_once_and_used_by_each_layer(tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, **OPTION_SETS["reversible, shared layers, shared embeddings, stable, sparse"])
    model = random_model(config)
    names = set(model.state_dict())
    assert {n.split(".attn.")[0] for n in names if ".attn." in n} == {"blocks.0", "blocks.1"}
    assert {n.split(".ff.")[0] for n in names if ".ff." in n} == {"blocks.0", "blocks.2"}  # ids 5, 5, 6, (5)
    assert "text_emb.weight" not in names and "image_emb.weight" not in names
    assert model.attn_owner == (0, 1, 0, 1) and model.ff_owner == (0, 0, 2, 0)
    # Changing the owner's weights changes what every sharing layer computes.
    text, image = inputs(config)
    with torch.no_grad():
        before = model(text, image).image_logits
        model.blocks[2].attn_norm.weight.mul_(1.5)  # not shared: layer 2 only
        middle = model(text, image).image_logits
        model.blocks[0].attn.to_qkv.weight.mul_(1.5)  # shared by layers 0 and 2
        after = model(text, image).image_logits
    assert not torch.allclose(before, middle) and not torch.allclose(middle, after)
    # Round trip through a checkpoint with every option on.
    model.save(tmp_path / "ckpt")
    loaded = DALLE.load(tmp_path / "ckpt").eval()
    assert loaded.config == config
    with torch.no_grad():
        assert torch.equal(loaded(text, image).image_logits, after)


def test_reversible_gradients_match_plain_autograd() -> None:
    config = dataclasses.replace(BASE, reversible=True, shift_tokens=True, rotary_emb=True, ff_dropout=0.3,
                                 attn_types=("axial_row", "full"), shared_ff_ids=(0, 0, 1))  # fmt: skip
    model = random_model(config, seed=3).double().train()
    text, image = inputs(config)
    torch.manual_seed(11)
    model.loss(text, image).loss.backward()
    reversible = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    # The same coupling through ordinary autograd (same dropout draws: same seed, same order of branch calls).
    from dalle_transformer.attention import PassContext

    torch.manual_seed(11)
    prepared = model.prepare_text(text)
    x = torch.cat([model._embed_prefix(prepared), model._embed_image(image[:, :-1])], dim=1)
    context = PassContext(0, None, "auto", (model.rotary_cos[: x.shape[1]], model.rotary_sin[: x.shape[1]]),
                          model.token_shift)  # fmt: skip
    x1 = x2 = x
    for i in range(config.depth):
        f, g = model._branches(list(model.blocks), i, context)
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    hidden = (x1 + x2) / 2
    t = config.text_seq_len
    text_loss = torch.nn.functional.cross_entropy(model._text_logits(hidden[:, :t]).flatten(0, 1), prepared.flatten())
    image_loss = torch.nn.functional.cross_entropy(model._image_logits(hidden[:, t:]).flatten(0, 1), image.flatten())
    ((text_loss + 7 * image_loss) / 8).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(reversible[name], parameter.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    plain = dataclasses.replace(BASE, attn_types=("conv_like", "axial_row"), ff_dropout=0.2, shift_tokens=True)
    grads = []
    for recompute in (False, True):
        model = random_model(dataclasses.replace(plain, gradient_checkpointing=recompute)).train()
        torch.manual_seed(5)
        model.loss(*inputs()).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_null_cond_prob_replaces_texts_in_training_only() -> None:
    text, image = inputs()
    null = torch.zeros_like(text)  # all padding: the null condition
    model = random_model(dataclasses.replace(BASE, null_cond_prob=1.0))
    with torch.no_grad():
        conditional = model(text, image)
        expected_null = model(null, image)
        model.train()
        dropped = model(text, image)
    assert not torch.allclose(conditional.image_logits, expected_null.image_logits)
    torch.testing.assert_close(dropped.image_logits, expected_null.image_logits, rtol=0, atol=0)
    torch.testing.assert_close(dropped.text_loss, expected_null.text_loss)  # the null text is the text target too
    assert torch.equal(text, inputs()[0])  # the caller's text is untouched
    # With probability 1/2, rows are dropped independently, drawn from torch's global RNG.
    half = random_model(dataclasses.replace(BASE, null_cond_prob=0.5)).train()
    many_text = text[1:].repeat(64, 1)
    many_image = image[1:].repeat(64, 1)
    torch.manual_seed(0)
    with torch.no_grad():
        out = half(many_text, many_image).image_logits[:, 0]
        reference = half.eval()(torch.cat([many_text[:1], null[:1]]), many_image[:2]).image_logits[:, 0]
    is_null = (out - reference[1]).abs().amax(-1) < 1e-5
    is_text = (out - reference[0]).abs().amax(-1) < 1e-5
    assert bool((is_null ^ is_text).all()) and 16 < int(is_null.sum()) < 48


def test_layer_scale_init_follows_depth() -> None:
    model = DALLE(dataclasses.replace(BASE, depth=26, layer_scale=True, dim=8, dim_head=4))
    scales = [float(block.attn_scale[0].detach()) for block in model.blocks]
    assert scales[:18] == [pytest.approx(0.1)] * 18
    assert scales[18:24] == [pytest.approx(1e-5)] * 6 and scales[24:] == [pytest.approx(1e-6)] * 2


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("attn_types", ()),
        ("attn_types", ("full", "diagonal")),
        ("conv_kernel_size", 4),
        ("conv_dilation", 0),
        ("sparse_block_size", 0),
        ("sparse_local_blocks", 0),
        ("sparse_stride", -1),
        ("reversible", 1),
        ("shared_attn_ids", ()),
        ("shared_ff_ids", (1, "a")),
        ("null_cond_prob", 1.5),
        ("ff_activation", "relu"),
        ("gradient_checkpointing", True),  # with reversible=True below
    ],
)
def test_option_validation_names_the_field(field: str, value: object) -> None:
    data = {**to_dict(BASE), "reversible": True, field: value}
    for build in (lambda: DALLEConfig(**data), lambda: from_dict(DALLEConfig, data)):
        with pytest.raises(ConfigError) as error:
            build()
        assert field in str(error.value) and len(str(error.value).splitlines()) == 1
    with pytest.raises(ConfigError, match="dim_head"):
        dataclasses.replace(BASE, rotary_emb=True, dim_head=5)


def test_options_roundtrip_through_dicts() -> None:
    config = dataclasses.replace(BASE, **OPTION_SETS["reversible, shared layers, shared embeddings, stable, sparse"])
    assert from_dict(DALLEConfig, to_dict(config)) == config
    assert DALLEConfig(**{**to_dict(config), "attn_types": ["sparse", "full"]}) == config  # lists become tuples
    assert config.layer_attn_types() == ("sparse", "full", "sparse", "full")
