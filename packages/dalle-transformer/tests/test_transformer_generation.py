"""KV-cached and uncached sampling: same numbers, same tokens, seeded, non-destructive."""

from __future__ import annotations

import pytest
import torch

from dalle_transformer import DALLE, DALLEConfig
from dalle_transformer.sampling import filter_top_k, sample_logits

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


def random_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    model = DALLE(CONFIG).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    return model.to(dtype)


def generate(model: DALLE, seed: int, **kwargs) -> torch.Tensor:
    return model.generate_image_ids(TEXT, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_cache_logits_match_teacher_forced_forward() -> None:
    model = random_model()
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
