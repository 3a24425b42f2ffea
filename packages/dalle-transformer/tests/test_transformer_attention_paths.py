"""Every attention type through each path: the efficient, FlexAttention and KV-cached paths against the dense one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dalle_transformer import DALLE, DALLEConfig
from dalle_transformer.kernels import (
    attend_decode,
    attend_dense,
    attend_efficient,
    attend_flex,
    attend_rows,
    attend_whole_cache,
)
from dalle_transformer.masks import AttentionPattern

TYPES = ["full", "axial_row", "axial_col", "conv_like", "sparse"]
STACKS = [(kind,) for kind in TYPES] + [("full", "axial_row", "axial_col", "conv_like"), ("sparse", "conv_like")]


def make_config(attn_types: tuple[str, ...], **options) -> DALLEConfig:
    return DALLEConfig(
        num_text_tokens=11,
        text_seq_len=4,
        num_image_tokens=13,
        image_fmap_size=5,
        dim=24,
        depth=len(attn_types),
        heads=2,
        dim_head=12,
        attn_types=attn_types,
        conv_kernel_size=3,
        sparse_block_size=4,
        sparse_local_blocks=2,
        sparse_stride=2,
        **options,
    )


def random_model(config: DALLEConfig, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    model = DALLE(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.4)
    return model


def inputs(config: DALLEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    text = torch.tensor([[3, 4, 0, 0], [9, 1, 2, 7]])
    return text, torch.randint(0, config.num_image_tokens, (2, config.image_seq_len), generator=generator)


def logits(model: DALLE, backend: str, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    model.set_attention_backend(backend)
    with torch.no_grad():
        out = model(text, image)
    return torch.cat([out.text_logits.flatten(1), out.image_logits.flatten(1)], dim=1)


@pytest.mark.parametrize("attn_types", STACKS, ids="+".join)
def test_efficient_and_flex_match_dense(attn_types: tuple[str, ...]) -> None:
    config = make_config(attn_types, rotary_emb=True, shift_tokens=True)
    model = random_model(config)
    text, image = inputs(config)
    dense = logits(model, "dense", text, image)
    assert dense.abs().max() > 1.0
    torch.testing.assert_close(logits(model, "efficient", text, image), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, "flex", text, image), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, "auto", text, image), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_types", STACKS[1:5], ids="+".join)
def test_efficient_gradients_match_dense(attn_types: tuple[str, ...]) -> None:
    model = random_model(make_config(attn_types)).train()  # no dropout configured: training is deterministic
    text, image = inputs(model.config)
    grads = {}
    for backend in ("dense", "efficient"):
        model.zero_grad()
        model.set_attention_backend(backend)
        model.loss(text, image).loss.backward()
        grads[backend] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads["dense"].items():
        torch.testing.assert_close(grads["efficient"][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_training_of_every_type_gives_eager_gradients() -> None:
    """``torch.compile`` of a model mixing the gathered attention types (with DALLE-pytorch's GEGLU feed-forward and
    LayerScale): the eager loss and gradients, and no graph break but the deliberate ``torch.compiler.disable`` calls
    (the index tables, traced into, hit a host read and broke the graph with a warning; so did the GEGLU's autograd
    function)."""
    from torch._dynamo.utils import counters

    config = make_config(("axial_row", "conv_like", "sparse"), ff_activation="geglu", layer_scale=True)
    model = random_model(config).train()
    text, image = inputs(model.config)
    model.loss(text, image).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    counters.clear()
    compiled = torch.compile(model)
    compiled(text, image).loss.backward()
    assert counters["stats"]["unique_graphs"] > 0
    unexpected = [reason for reason in counters["graph_break"] if "torch.compiler.disable" not in reason]
    assert not unexpected, unexpected
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn_types", STACKS, ids="+".join)
@pytest.mark.parametrize("primed", [0, 7])
def test_cached_decode_matches_dense_forward(attn_types: tuple[str, ...], primed: int) -> None:
    config = make_config(attn_types, rotary_emb=True, shift_tokens=True)
    model = random_model(config)
    text, image = inputs(config)
    model.set_attention_backend("dense")
    with torch.no_grad():
        expected = model(text, image).image_logits
        model.set_attention_backend("efficient")
        cache = model.new_cache(2)
        steps = [model.prefill(text, cache, image_prefix=image[:, :primed] if primed else None)]
        for k in range(primed, config.image_seq_len - 1):
            steps.append(model.decode_step(image[:, k], cache))
    assert cache.length == config.total_seq_len
    torch.testing.assert_close(torch.stack(steps, dim=1), expected[:, primed:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", TYPES)
def test_kernels_agree_row_by_row(kind: str) -> None:
    pattern = AttentionPattern(kind, text_len=4, fmap_size=4, kernel_size=3, dilation=1, block_size=3, local_blocks=2)
    length = pattern.max_len
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    dense = attend_dense(q, k, v, pattern)
    torch.testing.assert_close(attend_efficient(q, k, v, pattern), dense)
    torch.testing.assert_close(attend_efficient(q, k, v, pattern, stable=True), dense)
    torch.testing.assert_close(attend_flex(q, k, v, pattern), dense)
    for position in range(1, length):
        one = attend_decode(q[:, :, position : position + 1], k[:, :, : position + 1], v[:, :, : position + 1],
                            pattern, position)  # fmt: skip
        torch.testing.assert_close(one, dense[:, :, position : position + 1])
        # The CUDA form of a static decoding step: the whole cache under the position's mask row.
        whole = attend_whole_cache(q[:, :, position : position + 1], k, v, pattern, torch.tensor([position]))
        torch.testing.assert_close(whole, dense[:, :, position : position + 1])
    # Several new queries after a non-empty cache, and a shorter sequence (a prefix) on the efficient path.
    rows = attend_rows(q[:, :, 9:13], k[:, :, :13], v[:, :, :13], pattern, 9, 0.0)
    torch.testing.assert_close(rows, dense[:, :, 9:13])
    torch.testing.assert_close(attend_efficient(q[:, :, :11], k[:, :, :11], v[:, :, :11], pattern), dense[:, :, :11])


def test_dropout_runs_on_every_path_in_training() -> None:
    model = random_model(make_config(("axial_row", "conv_like"), attn_dropout=0.5)).train()
    text, image = inputs(model.config)
    for backend in ("dense", "efficient", "flex"):
        model.set_attention_backend(backend)
        torch.manual_seed(0)
        first = model(text, image).loss
        second = model(text, image).loss
        assert not torch.equal(first, second), backend  # dropout is active
    model.eval()
    assert torch.equal(model(text, image).loss, model(text, image).loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attn_types", STACKS[-2:], ids="+".join)
@pytest.mark.parametrize("dim_head", [12, 32])  # compiled FlexAttention pads head dims below 16
def test_cuda_flex_matches_cpu_dense(attn_types: tuple[str, ...], dim_head: int) -> None:
    config = dataclasses.replace(make_config(attn_types, rotary_emb=True, shift_tokens=True), dim_head=dim_head)
    cpu = random_model(config)
    gpu = random_model(config).cuda()
    text, image = inputs(config)
    expected = logits(cpu, "dense", text, image)
    got = logits(gpu, "flex", text.cuda(), image.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
