"""DALLE-pytorch ``dalle.pt`` transformers imported: our logits equal DALLE-pytorch's, computed by an independent
reference over its own parameter names (test_dalle_pytorch_reference.py), for every option and both layouts."""

from __future__ import annotations

import pytest
import torch
from test_dalle_pytorch_reference import Spec, reference_logits, write_weights

from dalle_transformer import DALLE, config_from_dalle_pytorch, convert_dalle_pytorch_weights

BASE = dict(dim=32, depth=2, heads=2, dim_head=16, num_text_tokens=30, text_seq_len=5)
MIXED = ("full", "axial_row", "axial_col", "conv_like")

# name: (hparams beyond BASE as train_dalle.py writes them, writer options)
CASES: dict[str, tuple[dict, dict]] = {
    "plain": (dict(shift_tokens=False, rotary_emb=False), {}),
    "mixed_attention": (dict(attn_types=MIXED, depth=4), {}),
    "rotary": (dict(rotary_emb=True), {}),
    "shift_tokens": (dict(shift_tokens=True), {}),
    "sandwich_norm": (dict(sandwich_norm=True), {}),
    "stable": (dict(stable=True), {}),
    "reversible": (dict(reversible=True), {}),
    # train_dalle.py stores sharing ids as the strings of its command line
    "shared_layers": (dict(depth=3, shared_attn_ids=("a", "a", "b"), shared_ff_ids=("0", "1", "1")), {}),
    "share_input_output_emb": (dict(share_input_output_emb=True), {}),
    "optimize_for_inference": (dict(attn_types=("axial_row", "axial_col"), optimize_for_inference=True), {}),
    "everything": (
        dict(
            depth=4,
            attn_types=MIXED,
            rotary_emb=True,
            shift_tokens=True,
            sandwich_norm=True,
            stable=True,
            reversible=True,
            shared_attn_ids=(0, 1, 2, 3, 0, 1, 2, 3),
            shared_ff_ids=(0, 0, 1, 1),
            share_input_output_emb=True,
        ),
        {},
    ),
    # 2022-2024: the 1.4+ layout with axial-positional-embedding 0.2's names
    "axial_0_2_names": (dict(), dict(axial=("weights_0", "weights_1"))),
    # Before 2022: fewer wrapper levels, old axial names, and (before August 2021) no shift/rotary hparams at all
    "before_2022": (dict(), dict(wrapped=False, axial=("weights_0", "weights_1"))),
    # (no conv_like: before DALLE-pytorch 1.5 it was another pattern, refused below)
    "before_2022_shift": (dict(shift_tokens=True, attn_types=MIXED[:3], depth=3), dict(wrapped=False)),
    "before_2022_rotary": (dict(rotary_emb=True, shift_tokens=False), dict(wrapped=False, old_rotary_table=True)),
    "before_2022_rotary_fixed_table": (dict(rotary_emb=True, sandwich_norm=True), dict(wrapped=False)),
}


def batch(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, spec.num_text_tokens, (2, spec.text_seq_len), generator=generator)
    text[0, 3:] = 0  # trailing padding
    text[1, 1] = 0  # padding inside the text: still a per-position padding token
    image = torch.randint(0, spec.image_tokens, (2, spec.fmap**2), generator=generator)
    return text, image


@pytest.mark.parametrize("case", list(CASES))
def test_imported_logits_equal_dalle_pytorch(case: str) -> None:
    hparams, layout = CASES[case]
    spec = Spec({**BASE, **hparams})
    weights = write_weights(spec, **layout)
    version = "1.6.6" if layout.get("wrapped", True) else None  # files from before 2022 record no version
    config = config_from_dalle_pytorch(spec.hparams, spec.fmap, spec.image_tokens, version=version)
    model = DALLE(config).eval()
    model.load_state_dict(convert_dalle_pytorch_weights(weights, config), strict=True)
    text, image = batch(spec)
    expected_text, expected_image = reference_logits(weights, spec, text, image, wrapped=layout.get("wrapped", True))
    with torch.no_grad():
        output = model(text, image)
    assert expected_image.abs().max() > 1.0  # far from trivial logits
    torch.testing.assert_close(output.text_logits.double(), expected_text, rtol=0, atol=1e-4)
    torch.testing.assert_close(output.image_logits.double(), expected_image, rtol=0, atol=1e-4)


def test_config_follows_the_hparams() -> None:
    hparams = {**BASE, **CASES["everything"][0], "loss_img_weight": 3, "attn_dropout": 0.1, "ff_dropout": 0.2}
    config = config_from_dalle_pytorch(hparams, image_fmap_size=4, num_image_tokens=20)
    assert (config.num_text_tokens, config.text_seq_len, config.num_image_tokens, config.image_fmap_size) == (
        30,
        5,
        20,
        4,
    )
    assert (config.text_pad_id, config.ff_activation, config.conv_kernel_size, config.layer_scale) == (
        0,
        "geglu",
        5,
        True,
    )
    assert config.attn_types == MIXED
    assert (config.rotary_emb, config.shift_tokens, config.sandwich_norm, config.stable, config.reversible) == (
        True,
        True,
        True,
        True,
        True,
    )
    assert config.shared_attn_ids == (0, 1, 2, 3, 0, 1, 2, 3) and config.shared_ff_ids == (0, 0, 1, 1)
    assert (config.loss_img_weight, config.attn_dropout, config.ff_dropout) == (3.0, 0.1, 0.2)


def test_missing_hparams_take_the_defaults_of_their_time() -> None:
    """Before August 2021 hparams had no shift_tokens / rotary_emb: False, not 1.6.6's True; the rest: 1.6.6's."""
    config = config_from_dalle_pytorch({"dim": 64, "depth": 2}, image_fmap_size=8, num_image_tokens=512)
    assert (config.shift_tokens, config.rotary_emb) == (False, False)
    assert (config.num_text_tokens, config.text_seq_len, config.heads, config.dim_head) == (10000, 256, 8, 64)
    assert config.attn_types == ("full",) and config.loss_img_weight == 7.0
    assert (config.shared_attn_ids, config.shared_ff_ids, config.share_input_output_emb) == (None, None, False)


def test_sharing_ids_keep_their_grouping() -> None:
    """Any hashable ids (strings from train_dalle.py, mixed types) group layers the same way as integers."""
    hparams = {**BASE, "depth": 5, "shared_attn_ids": ("x", 1, "x", "1"), "shared_ff_ids": [7, 7]}
    config = config_from_dalle_pytorch(hparams, 4, 20)
    assert config.shared_attn_ids == (0, 1, 0, 2)
    assert config.shared_ff_ids == (0, 0)


def test_half_precision_weights_become_float32() -> None:
    spec = Spec(dict(BASE))
    weights = {name: tensor.half() for name, tensor in write_weights(spec).items()}
    config = config_from_dalle_pytorch(spec.hparams, spec.fmap, spec.image_tokens)
    state = convert_dalle_pytorch_weights(weights, config)
    assert all(tensor.dtype == torch.float32 for tensor in state.values())
    assert torch.equal(state["to_logits.weight"], weights["to_logits.1.weight"].float())


def test_derived_buffers_and_vae_weights_are_skipped() -> None:
    """0.9.0-0.9.5 saved the logits mask; every dalle.pt holds the VAE's weights under vae.*."""
    spec = Spec(dict(BASE))
    weights = write_weights(spec, extra={"logits_mask": torch.ones(1, 21, 55, dtype=torch.bool)})
    config = config_from_dalle_pytorch(spec.hparams, spec.fmap, spec.image_tokens)
    state = convert_dalle_pytorch_weights(weights, config)
    assert not [name for name in state if "vae" in name or "mask" in name]


def test_bos_and_positions_are_split_as_dalle_pytorch_adds_them() -> None:
    spec = Spec(dict(BASE))
    weights = write_weights(spec)
    config = config_from_dalle_pytorch(spec.hparams, spec.fmap, spec.image_tokens)
    state = convert_dalle_pytorch_weights(weights, config)
    torch.testing.assert_close(state["bos"], weights["text_emb.weight"][0] + weights["text_pos_emb.weight"][0])
    assert torch.equal(state["text_pos_emb.weight"], weights["text_pos_emb.weight"][1:])
    assert torch.equal(state["image_row_emb.weight"], weights["image_pos_emb.weights.0"][0, :, 0])
    assert torch.equal(state["image_col_emb.weight"], weights["image_pos_emb.weights.1"][0, 0])
    assert torch.equal(state["blocks.1.ff_scale"], weights["transformer.layers.layers.1.1.scale"].flatten())
