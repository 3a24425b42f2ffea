"""The one mask definition per attention type, the index tables built from it, and the work counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformer_naive import naive_mask

from dalle_transformer import DALLEConfig
from dalle_transformer.accounting import decode_attention_work, forward_attention_work, pattern_work
from dalle_transformer.masks import layer_patterns
from dalle_transformer.plans import decode_keys, grouped_plan, image_cell_mask

BASE = DALLEConfig(num_text_tokens=10, text_seq_len=3, num_image_tokens=8, image_fmap_size=5, dim=8, depth=1)
VARIANTS = [
    ("full", {}),
    ("axial_row", {}),
    ("axial_col", {}),
    ("conv_like", {"conv_kernel_size": 3}),
    ("conv_like", {"conv_kernel_size": 3, "conv_dilation": 2}),
    ("conv_like", {"conv_kernel_size": 5}),
    ("sparse", {"sparse_block_size": 3, "sparse_local_blocks": 2, "sparse_stride": 3}),
    ("sparse", {"sparse_block_size": 4, "sparse_local_blocks": 1, "sparse_stride": 0}),
]


def config_for(kind: str, options: dict) -> DALLEConfig:
    return dataclasses.replace(BASE, attn_types=(kind,), **options)


@pytest.mark.parametrize(("kind", "options"), VARIANTS)
def test_mask_matches_per_pair_rules(kind: str, options: dict) -> None:
    config = config_for(kind, options)
    (pattern,) = layer_patterns(config)
    length = config.total_seq_len
    mask = pattern.square_mask(length)
    assert torch.equal(mask, naive_mask(config, kind, length))
    # Text queries: causal full attention, whatever the type.
    text_len = config.text_seq_len + 1
    assert torch.equal(mask[:text_len, :text_len], torch.ones(text_len, text_len).tril().bool())
    assert bool(mask[text_len:, :text_len].all())


def test_axial_and_conv_masks_match_dalle_pytorch_constructions() -> None:
    """Independent constructions in DALLE-pytorch's style: its static axial masks, its unfold-based conv window."""
    f, text_len = BASE.image_fmap_size, BASE.text_seq_len + 1
    n = f * f
    causal = torch.ones(text_len + n, text_len + n).tril().bool()
    for kind in ("axial_row", "axial_col"):
        static = torch.zeros(text_len + n, text_len + n, dtype=torch.bool)
        static[:, :text_len] = True
        for line in range(f):
            if kind == "axial_row":
                cells = text_len + line * f + torch.arange(f)
            else:
                cells = text_len + line + f * torch.arange(f)
            static[cells[:, None], cells[None, :]] = True
        static[:text_len] = True
        (pattern,) = layer_patterns(dataclasses.replace(BASE, attn_types=(kind,)))
        assert torch.equal(pattern.square_mask(text_len + n), static & causal)
    for kernel, dilation in ((3, 1), (3, 2), (5, 1)):
        reach = (kernel - 1) * dilation
        ones = F.pad(torch.ones(1, 1, f, f), (reach, 0, reach, 0))
        window = F.unfold(ones, kernel, dilation=dilation)[0].T.bool()  # [cell, kernel**2]: inside the grid
        offsets = torch.arange(kernel) * dilation - reach
        expected = torch.zeros(n, n, dtype=torch.bool)
        for cell in range(n):
            row, col = divmod(cell, f)
            for index, (dr, dc) in enumerate((int(a), int(b)) for a in offsets for b in offsets):
                if window[cell, index]:
                    expected[cell, (row + dr) * f + col + dc] = True
        config = dataclasses.replace(BASE, attn_types=("conv_like",), conv_kernel_size=kernel, conv_dilation=dilation)
        (pattern,) = layer_patterns(config)
        assert torch.equal(image_cell_mask(pattern)[:n, :n], expected)


@pytest.mark.parametrize(("kind", "options"), [v for v in VARIANTS if v[0] != "full"])
def test_grouped_plan_gathers_exactly_the_allowed_keys(kind: str, options: dict) -> None:
    (pattern,) = layer_patterns(config_for(kind, options))
    plan = grouped_plan(pattern, torch.device("cpu"))
    cells = image_cell_mask(pattern)
    n = pattern.fmap_size**2
    seen = []
    for bucket in plan.buckets:
        for g in range(bucket.query_cells.shape[0]):
            for s in range(bucket.query_cells.shape[1]):
                query = int(bucket.query_cells[g, s])
                if query == n:
                    assert not bool(bucket.mask[g, s].any())
                    continue
                seen.append(query)
                keys = bucket.key_cells[g][bucket.mask[g, s]]
                assert sorted(keys.tolist()) == cells[query, :n].nonzero().flatten().tolist()
    assert sorted(seen) == list(range(n))  # every image cell is a query exactly once
    flat = torch.cat([b.query_cells.flatten() for b in plan.buckets])
    assert torch.equal(flat[plan.order], torch.arange(n))


@pytest.mark.parametrize(("kind", "options"), VARIANTS)
def test_decode_keys_are_the_mask_rows(kind: str, options: dict) -> None:
    config = config_for(kind, options)
    (pattern,) = layer_patterns(config)
    mask = naive_mask(config, kind, config.total_seq_len)
    for position in range(config.total_seq_len):
        keys = decode_keys(pattern, position, torch.device("cpu"))
        allowed = mask[position].nonzero().flatten()
        if keys is None:
            assert torch.equal(allowed, torch.arange(position + 1))
        else:
            assert torch.equal(keys, allowed)


def test_work_counts_follow_the_formulas() -> None:
    t, f = 7, 6
    config = DALLEConfig(
        num_text_tokens=10, text_seq_len=t, num_image_tokens=8, image_fmap_size=f, dim=8, depth=2,
        attn_types=("full", "axial_row"),
    )  # fmt: skip
    text_len, n = t + 1, f * f
    length = text_len + n - 1
    full, axial = (pattern_work(p, length) for p in layer_patterns(config))
    assert full.dense == axial.dense == length**2
    assert full.allowed == full.efficient == length * (length + 1) // 2
    # axial_row: causal text, then each of the N - 1 image queries scores the T + 1 text keys and its row's keys
    # in the sequence (f, and f - 1 in the last row, whose last cell is only a target); allowed: the text and the
    # query's row prefix.
    assert axial.efficient == text_len * (text_len + 1) // 2 + (n - 1) * text_len + (f - 1) * f * f + (f - 1) ** 2
    row_prefix = sum(c + 1 for c in range(f)) * f - f  # the dropped last cell would see f keys
    assert axial.allowed == text_len * (text_len + 1) // 2 + (n - 1) * text_len + row_prefix
    assert axial.allowed < axial.efficient < axial.dense
    total = forward_attention_work(config)
    assert total.dense == 2 * length**2 and total.efficient == full.efficient + axial.efficient
    assert total.flex == 2 * 128 * 128  # one tile per layer at this size
    # Cached decode: axial_row reads the text and the row prefix; full reads everything.
    decode = decode_attention_work(config)
    positions = range(text_len, length)
    assert decode.full_rows == 2 * sum(p + 1 for p in positions)
    axial_reads = sum(text_len + (p - text_len) % f + 1 for p in positions)
    assert decode.gathered == sum(p + 1 for p in positions) + axial_reads


@pytest.mark.parametrize("kind", ["axial_row", "axial_col", "conv_like", "sparse"])
def test_efficient_path_skips_work_at_realistic_sizes(kind: str) -> None:
    config = DALLEConfig(
        num_text_tokens=10, text_seq_len=64, num_image_tokens=8, image_fmap_size=32, dim=8, depth=1,
        attn_types=(kind,),
    )  # fmt: skip
    work = forward_attention_work(config)
    assert work.allowed <= work.efficient < work.dense // 2
    assert decode_attention_work(config).gathered < decode_attention_work(config).full_rows // 2
