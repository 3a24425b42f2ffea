"""KV-cached and uncached sampling: same numbers, same tokens, seeded, non-destructive."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from dalle_core.errors import ShapeError
from dalle_transformer import DALLE, DALLEConfig
from dalle_transformer.decoding_weights import DecodingWeights
from dalle_transformer.generation import Sampler, sample_image_ids
from dalle_transformer.linear import ONEDNN_IS_FASTER, StreamedWeight, native_streaming_library
from dalle_transformer.sampling import (
    filter_top_k,
    filter_top_p,
    resolve_top_k,
    sample_logits,
    top_k_from_filter_thres,
)
from dalle_transformer.static_decode import StaticDecoder

CONFIG = DALLEConfig(
    num_text_tokens=11,
    text_seq_len=5,
    num_image_tokens=17,
    image_fmap_size=4,
    text_pad_id=0,
    dim=32,
    depth=2,
    heads=4,
    dim_head=8,
)
TEXT = torch.tensor([[3, 4, 5, 0, 0], [9, 0, 0, 0, 0], [1, 2, 3, 4, 5]])


def random_model(dtype: torch.dtype = torch.float32, seed: int = 0, std: float = 0.3, **options) -> DALLE:
    """A model of ``CONFIG`` with ``options`` replaced, every parameter drawn from N(0, std)."""
    torch.manual_seed(seed)
    model = DALLE(dataclasses.replace(CONFIG, **options)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, std)
    return model.to(dtype)


def generate(model: DALLE, seed: int, **kwargs) -> torch.Tensor:
    return model.generate_image_ids(TEXT, generator=torch.Generator().manual_seed(seed), **kwargs)


LAYER_OPTIONS = {
    "plain": {},
    "rotary": {"rotary_emb": True},
    "shift_tokens": {"shift_tokens": True},
    "sandwich_layer_scale": {"sandwich_norm": True, "layer_scale": True},
    "geglu": {"ff_activation": "geglu"},
    "reversible": {"reversible": True},
    "stable": {"stable": True},
    "shared": {"depth": 3, "shared_attn_ids": (0, 1, 0), "shared_ff_ids": (0, 0, 1)},
    # A 2048-wide feed-forward: its output projection is decoded through column blocks (dalle_transformer.linear).
    "wide_feed_forward": {"ff_mult": 64, "depth": 3, "shared_ff_ids": (0, 0, 1)},
    "every_option": {
        "rotary_emb": True,
        "shift_tokens": True,
        "sandwich_norm": True,
        "layer_scale": True,
        "ff_activation": "geglu",
        "reversible": True,
        "attn_types": ("axial_row", "conv_like"),
    },
    # The same without reversible layers: decoding steps through the sequential stack's one-position layers.
    "every_sequential_option": {
        "rotary_emb": True,
        "shift_tokens": True,
        "sandwich_norm": True,
        "layer_scale": True,
        "ff_activation": "geglu",
        "attn_types": ("axial_row", "conv_like"),
        "shared_attn_ids": (0, 0),
    },
}


@pytest.mark.parametrize("options", LAYER_OPTIONS.values(), ids=LAYER_OPTIONS.keys())
def test_cache_logits_match_teacher_forced_forward(options: dict) -> None:
    """Decoding steps (one position each: the layers' single-position path) give the teacher-forced logits."""
    model = random_model(**options)
    image = torch.randint(
        0, CONFIG.num_image_tokens, (3, CONFIG.image_seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = model(TEXT, image).image_logits
        cache = model.new_cache(3)
        steps = [model.prefill(TEXT, cache)]
        for k in range(CONFIG.image_seq_len - 1):
            steps.append(model.decode_step(image[:, k], cache))
        uncached = [model.next_image_logits(TEXT, image[:, :k]) for k in range(CONFIG.image_seq_len)]
    assert cache.length == CONFIG.total_seq_len
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(uncached, dim=1), expected, rtol=1e-5, atol=1e-5)


ATTENTION_OPTIONS = {kind: {"attn_types": (kind,)} for kind in ("axial_row", "axial_col", "conv_like", "sparse")}


@pytest.mark.parametrize(
    "options",
    [*LAYER_OPTIONS.values(), *ATTENTION_OPTIONS.values()],
    ids=[*LAYER_OPTIONS.keys(), *ATTENTION_OPTIONS.keys()],
)
def test_decode_step_at_device_positions_matches_decode_step(options: dict) -> None:
    """The static form of a decoding step (every index a device tensor, every buffer the whole cache) gives the eager
    step's logits and leaves the same cache, from a primed prefix on."""
    model = random_model(**options)
    image = torch.randint(0, CONFIG.num_image_tokens, (3, CONFIG.image_seq_len), generator=torch.Generator())
    primed = 3
    with torch.no_grad():
        eager, tensor_positions = model.new_cache(3), model.new_cache(3)
        # Stale values where later positions go: the mask, not zeros, must keep them out.
        for buffer in [*tensor_positions.keys, *tensor_positions.values]:
            buffer.normal_()
        model.prefill(TEXT, eager, image[:, :primed])
        model.prefill(TEXT, tensor_positions, image[:, :primed])
        static = StaticDecoder(model, tensor_positions)
        for k in range(primed, CONFIG.image_seq_len - 1):
            expected = model.decode_step(image[:, k], eager)
            torch.testing.assert_close(static(image[:, k], k), expected, rtol=1e-5, atol=1e-5)
    assert tensor_positions.length == eager.length == CONFIG.total_seq_len
    written = CONFIG.total_seq_len - 1  # the last image token is never fed
    for name in ("keys", "values"):
        got, expected = (torch.stack(getattr(cache, name))[..., :written, :] for cache in (tensor_positions, eager))
        torch.testing.assert_close(got, expected, msg=name)
    if eager.shift_inputs is not None:
        assert tensor_positions.shift_inputs is not None
        for got_layer, expected_layer in zip(tensor_positions.shift_inputs, eager.shift_inputs, strict=True):
            for got, expected in zip(got_layer, expected_layer, strict=True):
                torch.testing.assert_close(got[:, :written], expected[:, :written])


PROJECTIONS = {"qkv", "out", "ff_in", "ff_out"}


def _copies(layer: DecodingWeights) -> dict[str, torch.Tensor | StreamedWeight]:
    """A layer's few-row weight copies, by projection."""
    projections = {name: getattr(layer, name) for name in PROJECTIONS}
    return {name: p.prepared for name, p in projections.items() if p.prepared is not None}


def _copied_values(copy: torch.Tensor | StreamedWeight) -> torch.Tensor:
    """The ``[out, in]`` weight a few-row copy holds: the native library's blocks, oneDNN's blocked layout, or
    column blocks."""
    if isinstance(copy, StreamedWeight):
        return copy.values()
    return copy.to_dense() if copy.is_mkldnn else copy.transpose(0, 1).flatten(1)


def _copy_kind(copy: torch.Tensor | StreamedWeight) -> str:
    if isinstance(copy, StreamedWeight):
        return "streamed"
    return "onednn" if copy.is_mkldnn else "column blocks"


def test_projections_decode_through_copies_made_for_each_sequence() -> None:
    """Decoding copies the weights into the layout few-row products are fastest with when a sequence starts (once per
    shared weight): on AVX-512 CPUs every projection in the native library's blocks (oneDNN's layout without the
    library), elsewhere the wide ones in column blocks, and column blocks for a compiled step. A sequence started
    after the weights change decodes with the new ones."""
    model = random_model(std=0.05, **LAYER_OPTIONS["wide_feed_forward"])
    image = torch.randint(
        0, CONFIG.num_image_tokens, (3, CONFIG.image_seq_len), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        cache = model.new_cache(3)
        model.prefill(TEXT, cache)
        assert cache.layer_weights is not None
        copies = [_copies(layer) for layer in cache.layer_weights]
        kind = "streamed" if native_streaming_library() else "onednn" if ONEDNN_IS_FASTER else "column blocks"
        assert [set(layer) for layer in copies] == [PROJECTIONS if kind != "column blocks" else {"ff_out"}] * 3
        assert all(_copy_kind(copy) == kind for layer in copies for copy in layer.values())
        assert copies[0]["ff_out"] is copies[1]["ff_out"] is not copies[2]["ff_out"]
        _, ff_out = model.blocks[2].ff.projections
        torch.testing.assert_close(_copied_values(copies[2]["ff_out"]), ff_out.weight)
        # The image logits' projection too, in those two layouts (it is too narrow for column blocks).
        assert cache.image_head is not None and (cache.image_head.prepared is not None) == (kind != "column blocks")
        if cache.image_head.prepared is not None:
            image_rows = model.to_logits.weight[CONFIG.num_text_logits :]
            torch.testing.assert_close(_copied_values(cache.image_head.prepared), image_rows)

        ff_out.weight.mul_(-1.5)  # as an optimizer step would: in place
        cache.reset()
        model.prefill(TEXT, cache)
        step = model.decode_step(image[:, 0], cache)
        model.compile_decoding = True  # copies a compiled step can take: column blocks
        compiled_cache = model.new_cache(3)
        model.prefill(TEXT, compiled_cache)
        assert compiled_cache.layer_weights is not None
        compiled_copies = [_copies(layer) for layer in compiled_cache.layer_weights]
        assert [set(layer) for layer in compiled_copies] == [{"ff_out"}] * 3
        assert _copy_kind(compiled_copies[0]["ff_out"]) == "column blocks"
        torch.testing.assert_close(_copied_values(compiled_copies[2]["ff_out"]), ff_out.weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed compile falls back to eager steps with a warning: not here
            compiled = StaticDecoder(model, compiled_cache, compile_step=True)(image[:, 0], 0)
        expected = model(TEXT, image).image_logits[:, 1]
    torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)

    model.compile_decoding = False
    model.decoding_weight_copies = False  # the weights as stored: no copies, the same logits
    with torch.no_grad():
        cache.reset()
        model.prefill(TEXT, cache)
        assert cache.layer_weights is not None and [_copies(layer) for layer in cache.layer_weights] == [{}] * 3
        assert cache.image_head is not None and cache.image_head.prepared is None
        torch.testing.assert_close(model.decode_step(image[:, 0], cache), expected, rtol=1e-5, atol=1e-5)


def test_decoding_after_a_prefill_with_autograd_reads_the_weights_as_stored() -> None:
    """A prefill with autograd on gathers no decoding tensors (nor copies); steps after it, eager or static, gather
    them without copies and give the teacher-forced logits."""
    model = random_model(layer_scale=True)
    image = torch.randint(0, CONFIG.num_image_tokens, (3, 2), generator=torch.Generator().manual_seed(0))
    caches = [model.new_cache(3), model.new_cache(3)]
    for cache in caches:
        model.prefill(TEXT, cache)
        assert cache.layer_weights is None and cache.image_head is None
    with torch.no_grad():
        expected = model.next_image_logits(TEXT, image[:, :1])
        eager = model.decode_step(image[:, 0], caches[0])
        static = StaticDecoder(model, caches[1])(image[:, 0], 0)
    for cache, logits in zip(caches, (eager, static), strict=True):
        assert cache.layer_weights is not None and all(not _copies(layer) for layer in cache.layer_weights)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_static_steps_need_the_positions_before_them() -> None:
    model = random_model()
    with torch.no_grad():
        cache = model.new_cache(3)
        static = StaticDecoder(model, cache)
        with pytest.raises(ShapeError, match="needs a KV cache holding 6 positions"):
            static(TEXT[:, 0], 0)  # nothing prefilled
        model.prefill(TEXT, cache)
        with pytest.raises(ShapeError, match="image position 2 needs a KV cache holding 8 positions"):
            static(TEXT[:, 0], 2)
        static(TEXT[:, 0], 0)
        assert cache.length == CONFIG.text_seq_len + 2


def test_compiled_decoding_gives_the_eager_ids() -> None:
    """``compile_decoding``: torch.compile's build of the step (one build for every position) samples what the
    eager steps sample, with guidance, priming and every layer option (float64: no rounding ties)."""
    model = random_model(torch.float64, **LAYER_OPTIONS["every_option"])
    prime = torch.randint(0, CONFIG.num_image_tokens, (3, 4), generator=torch.Generator())

    def sample() -> torch.Tensor:
        return model.generate_image_ids(
            TEXT, cond_scale=2.5, top_k=9, init_image_ids=prime, generator=torch.Generator().manual_seed(5)
        )

    from torch._dynamo.utils import counters

    eager = sample()
    model.compile_decoding = True
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compile falls back to eager steps with a warning: not here
        assert torch.equal(sample(), eager)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, None), (0.7, 5), (1.5, 3), (1.0, 1)])
def test_cached_equals_uncached_token_for_token(dtype: torch.dtype, temperature: float, top_k: int | None) -> None:
    model = random_model(dtype)
    for seed in range(4):
        cached = generate(model, seed, temperature=temperature, top_k=top_k, use_cache=True)
        uncached = generate(model, seed, temperature=temperature, top_k=top_k, use_cache=False)
        assert cached.dtype == torch.int64 and cached.shape == (3, CONFIG.image_seq_len)
        assert torch.equal(cached, uncached), f"seed {seed}"


def test_seeds_determine_the_output() -> None:
    model = random_model()
    first = generate(model, 123)
    assert torch.equal(first, generate(model, 123))
    outputs = {tuple(generate(model, seed).flatten().tolist()) for seed in range(5)}
    assert len(outputs) == 5
    assert int(first.min()) >= 0 and int(first.max()) < CONFIG.num_image_tokens


def test_top_k_one_is_greedy() -> None:
    model = random_model()
    ids = generate(model, 0, top_k=1)
    greedy = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(CONFIG.image_seq_len):
            greedy = torch.cat([greedy, model.next_image_logits(TEXT, greedy).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, greedy)
    # Greedy decoding ignores the seed and the temperature.
    assert torch.equal(generate(model, 99, top_k=1, temperature=3.0), greedy)


def test_inputs_and_mode_untouched() -> None:
    model = random_model().train()
    text = TEXT.clone()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    ids = generate(model, 0, top_k=4)
    ids_uncached = model.generate_image_ids(text, top_k=4, use_cache=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(text, TEXT)
    assert model.training  # restored after generating in eval mode
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert torch.equal(ids, ids_uncached)
    assert not ids.is_inference()  # usable in later autograd code
    ids[0, 0] = 1  # and writable


def test_short_text_generation_equals_padded_text() -> None:
    model = random_model()
    short = model.generate_image_ids(TEXT[:, :3], generator=torch.Generator().manual_seed(5))
    assert torch.equal(short, generate(model, 5))


def test_filter_top_k_and_temperature() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 5.0, 1.0, 0.0, 5.0]])
    filtered = filter_top_k(logits, 2)
    assert filtered[0].tolist() == [float("-inf"), 3.0, float("-inf"), 2.0, float("-inf")]
    assert filtered[1].tolist() == [5.0, 5.0, float("-inf"), float("-inf"), 5.0]  # ties with the k-th are kept
    assert torch.equal(filter_top_k(logits, None), logits) and torch.equal(filter_top_k(logits, 5), logits)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=2, generator=generator) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 1, 4}
    # Low temperature concentrates on the arg-max, high temperature spreads out.
    cold = torch.stack([sample_logits(logits[:1], temperature=0.05, generator=generator) for _ in range(100)])
    assert set(cold.flatten().tolist()) == {1}
    hot = torch.stack([sample_logits(logits[:1], temperature=100.0, generator=generator) for _ in range(200)])
    assert set(hot.flatten().tolist()) == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("vocab", [40, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filter_top_k_keeps_what_sorting_keeps(vocab: int, dtype: torch.dtype) -> None:
    """Every count, by selection (most of the vocabulary kept) or by topk (a few ids kept), against a sort; rounded
    logits, so many values tie with the k-th."""
    logits = (torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab), dtype=dtype) * 4).round()
    for top_k in sorted({1, 2, vocab // 16, vocab // 8, vocab // 8 + 1, vocab // 2, vocab - 1}):
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        expected = torch.where(logits >= kth, logits, float("-inf"))
        assert torch.equal(filter_top_k(logits, top_k), expected), top_k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_cpu_generator_matches_cpu() -> None:
    cpu = random_model(torch.float64)
    gpu = random_model(torch.float64).cuda()
    expected = generate(cpu, 3, top_k=6)
    for use_cache in (True, False):
        ids = gpu.generate_image_ids(
            TEXT.cuda(), top_k=6, use_cache=use_cache, generator=torch.Generator().manual_seed(3)
        )
        assert ids.device.type == "cuda"
        assert torch.equal(ids.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", LAYER_OPTIONS.values(), ids=LAYER_OPTIONS.keys())
def test_cuda_graph_decoding_matches_eager_steps(options: dict) -> None:
    """Steps replayed from a CUDA graph (plain and torch.compile'd) give the eager steps' ids, with guidance and a
    primed prefix."""
    model = random_model(torch.float64, **options).cuda()
    prime = torch.randint(0, CONFIG.num_image_tokens, (3, 4), generator=torch.Generator()).cuda()

    def sample() -> torch.Tensor:
        return model.generate_image_ids(
            TEXT.cuda(), cond_scale=2.5, top_k=9, init_image_ids=prime, generator=torch.Generator().manual_seed(5)
        )

    model.cuda_graph_decoding = False
    eager = sample()
    model.cuda_graph_decoding = True
    assert torch.equal(sample(), eager)
    check_graphed_logits(model, compile_step=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_cuda_graph_step_gives_the_forward_logits() -> None:
    model = random_model(torch.float64, **LAYER_OPTIONS["every_option"])
    check_graphed_logits(model.cuda(), compile_step=True)


def check_graphed_logits(model: DALLE, compile_step: bool) -> None:
    image = torch.randint(0, CONFIG.num_image_tokens, (3, CONFIG.image_seq_len), generator=torch.Generator()).cuda()
    with torch.inference_mode():
        expected = model(TEXT.cuda(), image).image_logits
        cache = model.new_cache(3)
        logits = [model.prefill(TEXT.cuda(), cache)]
        graphed = StaticDecoder(model, cache, compile_step=compile_step, cuda_graph=True)
        logits += [graphed(image[:, k], k) for k in range(CONFIG.image_seq_len - 1)]
    torch.testing.assert_close(torch.stack(logits, dim=1), expected, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- attention types, guidance, priming, previews

TYPED = DALLEConfig(
    num_text_tokens=11,
    text_seq_len=5,
    num_image_tokens=17,
    image_fmap_size=4,
    dim=24,
    depth=4,
    heads=2,
    dim_head=12,
    conv_kernel_size=3,
    sparse_block_size=3,
    sparse_local_blocks=2,
    sparse_stride=2,
    rotary_emb=True,
    shift_tokens=True,
)
ATTN_STACKS = [
    ("full",),
    ("axial_row",),
    ("axial_col",),
    ("conv_like",),
    ("sparse",),
    ("full", "axial_row", "axial_col", "conv_like"),
]


def typed_model(attn_types: tuple[str, ...] = ("full", "axial_row", "axial_col", "conv_like"), **options) -> DALLE:
    config = dataclasses.replace(TYPED, attn_types=attn_types, **options)
    torch.manual_seed(0)
    model = DALLE(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("attn_types", ATTN_STACKS, ids="+".join)
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_equals_uncached_for_every_attention_type(attn_types: tuple[str, ...], cond_scale: float) -> None:
    model = typed_model(attn_types)
    for seed in range(2):
        kwargs = {"cond_scale": cond_scale, "top_k": 8, "temperature": 0.9}
        cached = generate(model, seed, use_cache=True, **kwargs)
        uncached = generate(model, seed, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), f"seed {seed}"


def test_guidance_combines_conditional_and_null_logits() -> None:
    model = typed_model()
    scale = 2.5
    ids = model.generate_image_ids(TEXT, cond_scale=scale, top_k=1)
    # Independent reference: greedy decoding on null + (cond - null) * scale, from separate uncached forwards.
    null_text = torch.zeros_like(TEXT)
    expected = torch.zeros(3, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(TYPED.image_seq_len):
            cond = model.next_image_logits(TEXT, expected)
            null = model.next_image_logits(null_text, expected)
            guided = null + (cond - null) * scale
            expected = torch.cat([expected, guided.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, expected)
    assert not torch.equal(ids, model.generate_image_ids(TEXT, top_k=1))  # guidance changes the images


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_at_scale_one_equals_conditional_sampling(use_cache: bool) -> None:
    model = typed_model()
    text = model.prepare_text(TEXT)
    for seed in range(3):
        plain = generate(model, seed, top_p=0.9, use_cache=use_cache)
        sampler = Sampler(1.0, None, 0.9, torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            batched = sample_image_ids(model, text, text.new_zeros(3, 0), sampler, 1.0, use_cache, null_rows=True)
        assert torch.equal(batched, plain), f"seed {seed}"


def test_caller_tensors_are_never_modified() -> None:
    model = typed_model()
    text, init = TEXT.clone(), torch.randint(0, 17, (3, 16), generator=torch.Generator().manual_seed(0))
    init_copy = init.clone()
    for use_cache in (True, False):
        model.generate_image_ids(text, cond_scale=3.0, init_image_ids=init, num_init_img_tokens=5, use_cache=use_cache)
        model.generate_text_ids(text[:, :2], use_cache=use_cache)
    assert torch.equal(text, TEXT) and torch.equal(init, init_copy)


@pytest.mark.parametrize("use_cache", [True, False])
def test_priming_keeps_the_given_prefix(use_cache: bool) -> None:
    model = typed_model()
    init = torch.randint(0, 17, (3, 16), generator=torch.Generator().manual_seed(4))
    ids = model.generate_image_ids(TEXT, init_image_ids=init, num_init_img_tokens=6, use_cache=use_cache,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(ids[:, :6], init[:, :6])
    assert not torch.equal(ids[:, 6:], init[:, 6:])
    other = model.generate_image_ids(TEXT, init_image_ids=init[:, :6], use_cache=not use_cache,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert torch.equal(ids, other)  # a 6-token prefix keeps all 6; cached == uncached
    whole = model.generate_image_ids(TEXT, init_image_ids=init, use_cache=use_cache)
    assert torch.equal(whole[:, :7], init[:, :7])  # default: int(0.4375 * 16) = 7 tokens
    greedy = model.generate_image_ids(TEXT, init_image_ids=init, num_init_img_tokens=6, top_k=1)
    expected = init[:, :6]
    with torch.no_grad():
        for _ in range(6, 16):
            expected = torch.cat([expected, model.next_image_logits(TEXT, expected).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)


def test_callback_previews() -> None:
    model = typed_model()
    calls = []

    def preview(step: int, ids: torch.Tensor) -> None:
        calls.append((step, ids.clone()))
        ids.fill_(0)  # a copy: scribbling on it changes nothing

    init = torch.randint(0, 17, (3, 16), generator=torch.Generator().manual_seed(4))
    ids = model.generate_image_ids(TEXT, init_image_ids=init, num_init_img_tokens=3, callback=preview,
                                   callback_every=5, generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [step for step, _ in calls] == [8, 13, 16]
    for step, seen in calls:
        assert torch.equal(seen, ids[:, :step])
    assert torch.equal(ids, model.generate_image_ids(TEXT, init_image_ids=init, num_init_img_tokens=3,
                                                     generator=torch.Generator().manual_seed(0)))  # fmt: skip


def naive_top_p(logits: list[float], top_p: float) -> set[int]:
    probs = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        kept.append(i)
        mass += probs[i]
    smallest = min(probs[i] for i in kept)
    return {i for i, p in enumerate(probs) if p >= smallest}  # ties with the last kept are kept


def test_top_p_against_naive_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 12, generator=generator, dtype=torch.float64)
    logits[0] = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0, 0.0, -1.0, -2.0, -3.0, -3.0, -4.0, -5.0], dtype=torch.float64)
    for top_p in (0.05, 0.3, 0.5, 0.9, 0.999):
        filtered = filter_top_p(logits, top_p)
        for row in range(logits.shape[0]):
            kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
            assert kept == naive_top_p(logits[row].tolist(), top_p), (top_p, row)
    assert torch.equal(filter_top_p(logits, 1.0), logits) and torch.equal(filter_top_p(logits, None), logits)
    draws = torch.stack([sample_logits(logits[:2], top_p=0.5, generator=generator) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == naive_top_p(logits[0].tolist(), 0.5) == {0, 1, 2}
    assert set(draws[:, 1].tolist()) == naive_top_p(logits[1].tolist(), 0.5)


def test_top_k_fraction_counts_the_image_vocabulary() -> None:
    assert resolve_top_k(None, 0.25, 17) == 4 and resolve_top_k(None, 0.01, 17) == 1 and resolve_top_k(3, None, 17) == 3
    assert top_k_from_filter_thres(0.9, 1000) == 99  # DALLE-pytorch's own rounding of (1 - 0.9) * 1000
    assert top_k_from_filter_thres(0.5, 17) == 8
    model = typed_model()
    assert torch.equal(generate(model, 2, top_k_fraction=0.25), generate(model, 2, top_k=4))


def test_generate_text_ids() -> None:
    model = typed_model()
    prefix = torch.tensor([[3, 4], [9, 0], [1, 2]])  # the second row already ends with padding
    for seed in range(3):
        cached = model.generate_text_ids(prefix, generator=torch.Generator().manual_seed(seed))
        uncached = model.generate_text_ids(prefix, use_cache=False, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(cached, uncached)
        assert cached.shape == (3, TYPED.text_seq_len) and cached.dtype == torch.int64
        assert torch.equal(cached[:, :2], prefix) and bool((cached[1, 1:] == 0).all())
        assert int(cached.min()) >= 0 and int(cached.max()) < TYPED.num_text_tokens
    # Greedy completion is the arg-max of the text logits, one token at a time.
    greedy = model.generate_text_ids(prefix[:1], top_k=1)
    expected = prefix[:1]
    with torch.no_grad():
        for i in range(2, TYPED.text_seq_len):
            prepared = model.prepare_text(expected)[:, :i]
            hidden = model._transform(model._embed_prefix(prepared))
            expected = torch.cat([expected, model._text_logits(hidden[:, -1]).argmax(-1, keepdim=True)], dim=1)
    expected = torch.where(expected >= TYPED.num_text_tokens, 0, expected)
    # After the first padding everything is padding.
    first_pad = (expected[0] == 0).nonzero()
    if len(first_pad):
        expected[0, int(first_pad[0]) :] = 0
    assert torch.equal(greedy, expected)


def test_generate_text_ids_stops_at_padding() -> None:
    model = typed_model()
    with torch.no_grad():
        model.to_logits.bias[TYPED.num_text_tokens + 3] = 100.0  # position 3's padding token is overwhelmingly likely
    ids = model.generate_text_ids(torch.tensor([[5], [6]]), generator=torch.Generator().manual_seed(0))
    assert ids[:, 0].tolist() == [5, 6] and bool((ids[:, 1:] == 0).all())
    empty = model.generate_text_ids(torch.zeros(2, 0, dtype=torch.long))
    assert empty.shape == (2, TYPED.text_seq_len) and bool((empty == 0).all())


def test_row_generators_make_each_row_independent_of_the_batch() -> None:
    model = typed_model()
    seeds = [7, 8, 9]
    for use_cache in (True, False):
        batched = model.generate_image_ids(
            TEXT, row_generators=[torch.Generator().manual_seed(s) for s in seeds], cond_scale=2.0, use_cache=use_cache
        )
        for row, seed in enumerate(seeds):
            alone = model.generate_image_ids(
                TEXT[row : row + 1], generator=torch.Generator().manual_seed(seed), cond_scale=2.0, use_cache=use_cache
            )
            assert torch.equal(batched[row : row + 1], alone)


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_training_after_generating_with_every_attention_type(backend: str) -> None:
    """Index tables and masks first built while generating (in inference mode) are reused by training: they must be
    ordinary tensors, or autograd refuses them."""
    config = dataclasses.replace(
        CONFIG, depth=5, shift_tokens=True, attn_types=("full", "axial_row", "axial_col", "conv_like", "sparse")
    )
    model = DALLE(config)
    model.set_attention_backend(backend)
    image = torch.randint(0, CONFIG.num_image_tokens, (3, CONFIG.image_seq_len), generator=torch.Generator())
    for use_cache in (True, False):
        model.generate_image_ids(TEXT, use_cache=use_cache, generator=torch.Generator().manual_seed(0))
    model.train()
    model(TEXT, image).loss.backward()
    assert all(p.grad is not None and bool(p.grad.isfinite().all()) for p in model.parameters() if p.requires_grad)
