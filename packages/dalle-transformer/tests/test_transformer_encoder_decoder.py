"""The encoder-decoder architecture: a naive reference forward, caching, guidance, causality, checkpoints, learning."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformer_naive import gelu, layer_norm, naive_allowed

from dalle_core.errors import ConfigError
from dalle_transformer import DALLE, DALLEConfig, EncoderDecoderDALLE
from dalle_transformer.linear import ONEDNN_IS_FASTER, native_streaming_library

CONFIG = DALLEConfig(
    num_text_tokens=20,
    text_seq_len=5,
    num_image_tokens=16,
    image_fmap_size=3,
    text_pad_id=0,
    dim=32,
    depth=3,
    heads=2,
    dim_head=8,
    ff_mult=2,
    architecture="encoder_decoder",
    encoder_depth=2,
    attn_types=("full", "axial_row", "conv_like"),
    conv_kernel_size=3,
)
TEXT = torch.tensor([[3, 7, 9, 0, 0], [5, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # the last row is the null condition


def make_model(config: DALLEConfig = CONFIG, seed: int = 0) -> DALLE:
    torch.manual_seed(seed)
    model = DALLE(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so the reference checks them too
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def random_image(batch: int, seed: int = 1, config: DALLEConfig = CONFIG) -> torch.Tensor:
    return torch.randint(
        0, config.num_image_tokens, (batch, config.image_seq_len), generator=torch.Generator().manual_seed(seed)
    )


# ---------------------------------------------------------------- naive reference (float64, per row, per head)


def _attention(h: torch.Tensor, memory: torch.Tensor, attn: torch.nn.Module, mask: torch.Tensor, c) -> torch.Tensor:
    inner = c.heads * c.dim_head
    q_all, kv = h @ attn.to_q.weight.T, memory @ attn.to_kv.weight.T
    heads = []
    for head in range(c.heads):
        part = slice(head * c.dim_head, (head + 1) * c.dim_head)
        q, k, v = q_all[:, part], kv[:, part], kv[:, inner + part.start : inner + part.stop]
        scores = (q @ k.T / math.sqrt(c.dim_head)).masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.to_out.weight.T + attn.to_out.bias


def _self_attention(h: torch.Tensor, attn: torch.nn.Module, mask: torch.Tensor, c) -> torch.Tensor:
    inner = c.heads * c.dim_head
    qkv = h @ attn.to_qkv.weight.T
    heads = []
    for head in range(c.heads):
        part = slice(head * c.dim_head, (head + 1) * c.dim_head)
        q, k, v = (qkv[:, offset + part.start : offset + part.stop] for offset in (0, inner, 2 * inner))
        scores = (q @ k.T / math.sqrt(c.dim_head)).masked_fill(~mask, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.to_out.weight.T + attn.to_out.bias


def _feed_forward(h: torch.Tensor, net: torch.nn.Sequential) -> torch.Tensor:
    return gelu(h @ net[0].weight.T + net[0].bias) @ net[3].weight.T + net[3].bias


def naive_image_logits(model: EncoderDecoderDALLE, text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Written from the architecture's description: encoder over the text (padding keys masked except a position's
    own), decoder over [BOS, image] with the layer's pattern (BOS as the only 'text' position) and cross-attention
    to every encoder output."""
    c = model.config
    t, n = c.text_seq_len, c.image_seq_len
    decoder_layout = SimpleNamespace(**{**c.to_dict(), "text_seq_len": 0})  # text part = BOS alone
    kinds = [c.attn_types[i % len(c.attn_types)] for i in range(c.depth)]
    masks = {
        kind: torch.tensor([[naive_allowed(decoder_layout, kind, i, j) for j in range(n)] for i in range(n)])
        for kind in set(kinds)
    }
    outs = []
    for b in range(text_ids.shape[0]):
        ids = [int(v) for v in text_ids[b]] + [c.text_pad_id] * (t - text_ids.shape[1])
        real = [v != c.text_pad_id for v in ids]
        tokens = [v if real[i] else c.num_text_tokens + i for i, v in enumerate(ids)]
        x = torch.stack([model.text_emb.weight[tokens[i]] + model.text_pos_emb.weight[i] for i in range(t)])
        enc_mask = torch.tensor([[real[j] or i == j for j in range(t)] for i in range(t)])
        for layer in model.encoder:
            x = x + _attention(
                layer_norm(x, layer.attn_branch.norm), layer_norm(x, layer.attn_branch.norm), layer.attn, enc_mask, c
            )
            x = x + _feed_forward(layer_norm(x, layer.ff_branch.norm), layer.ff.net)
        memory = layer_norm(x, model.encoder_norm)
        y = torch.zeros(n, c.dim, dtype=torch.float64)
        y[0] = model.bos
        for j in range(n - 1):
            row, col = divmod(j, c.image_fmap_size)
            y[1 + j] = model.image_emb.weight[int(image_ids[b, j])] + model.image_row_emb.weight[row]
            y[1 + j] += model.image_col_emb.weight[col]
        everything = torch.ones(n, t, dtype=torch.bool)
        for i, layer in enumerate(model.decoder):
            block = layer.block
            y = y + _self_attention(layer_norm(y, block.attn_norm), block.attn, masks[kinds[i]], c)
            y = y + _attention(layer_norm(y, layer.cross_branch.norm), memory, layer.cross, everything, c)
            y = y + _feed_forward(layer_norm(y, block.ff_norm), block.ff.net)
        outs.append(layer_norm(y, model.norm) @ model.to_logits.weight.T + model.to_logits.bias)
    return torch.stack(outs)


@pytest.mark.parametrize("backend", ["dense", "efficient"])
def test_forward_matches_naive_reference(backend: str) -> None:
    model = make_model()
    model.set_attention_backend(backend)
    image = random_image(3)
    output = model(TEXT, image)
    with torch.no_grad():
        expected = naive_image_logits(model.double(), TEXT, image)
    torch.testing.assert_close(output.image_logits.double(), expected, atol=1e-5, rtol=1e-5)
    loss = torch.nn.functional.cross_entropy(expected.flatten(0, 1), image.flatten())
    assert float(output.loss.detach()) == pytest.approx(float(loss), abs=1e-5)
    assert float(output.text_loss) == 0.0 and output.text_logits.shape == (3, 0, CONFIG.num_text_logits)


# ---------------------------------------------------------------- encoder sees everything, decoder stays causal


def test_encoder_is_bidirectional_and_decoder_causal() -> None:
    model = make_model()
    text = torch.tensor([[3, 7, 9, 4, 11]])
    image = random_image(1)
    with torch.no_grad():
        base = model(text, image).image_logits
        changed_text = text.clone()
        changed_text[0, -1] = 12
        # The last caption token reaches the first image token's logits (read from BOS).
        assert (model(changed_text, image).image_logits[0, 0] - base[0, 0]).abs().max() > 1e-6
        for j in (0, 4, 7):
            changed = image.clone()
            changed[0, j] = (changed[0, j] + 1) % CONFIG.num_image_tokens
            logits = model(text, changed).image_logits
            # Position p predicts image token p from tokens < p: token j influences only positions > j.
            torch.testing.assert_close(logits[0, : j + 1], base[0, : j + 1], atol=0, rtol=0)
            assert (logits[0, j + 1 :] - base[0, j + 1 :]).abs().max() > 1e-6


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("attn_types", [("full",), ("axial_row", "axial_col", "conv_like")])
@pytest.mark.parametrize("cond_scale", [1.0, 3.0])
def test_cached_generation_equals_uncached(attn_types: tuple[str, ...], cond_scale: float) -> None:
    model = make_model(replace(CONFIG, attn_types=attn_types))
    text = TEXT[:2]
    ids = {}
    for use_cache in (True, False):
        ids[use_cache] = model.generate_image_ids(
            text, cond_scale=cond_scale, top_k=8, use_cache=use_cache, generator=torch.Generator().manual_seed(5)
        )
    assert torch.equal(ids[True], ids[False])
    # And the guided greedy choice matches logits computed one prefix at a time from the public pieces.
    greedy = model.generate_image_ids(text, cond_scale=cond_scale, top_k=1)
    expected = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for _ in range(CONFIG.image_seq_len):
            cond = model.next_image_logits(text, expected)
            null = model.next_image_logits(torch.zeros_like(text), expected)
            guided = null + (cond - null) * cond_scale
            expected = torch.cat([expected, guided.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, expected)


@pytest.mark.parametrize("ff_mult", [4, 64], ids=["narrow", "wide"])  # wide: 2048-column weights, copied to decode
def test_prefill_and_decode_steps_match_full_forward(ff_mult: int) -> None:
    model = make_model(replace(CONFIG, ff_mult=ff_mult))
    image = random_image(3)
    with torch.no_grad():
        full = model(TEXT, image).image_logits
        cache = model.new_cache(3)
        steps = [model.prefill(TEXT, cache, image_prefix=image[:, :2])]
        # Copied: the wide weights in column blocks, or every weight in the native library's or oneDNN's layout
        # where those are faster.
        assert cache.layer_weights is not None
        copied = ff_mult == 64 or ONEDNN_IS_FASTER or native_streaming_library() is not None
        assert all((layer.ff_out.prepared is not None) == copied for layer in cache.layer_weights)
        for k in range(2, CONFIG.image_seq_len - 1):
            steps.append(model.decode_step(image[:, k], cache))
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 2:], atol=1e-5, rtol=1e-5)


def test_encoder_memory_is_computed_once_per_prompt() -> None:
    model = make_model()
    calls = []
    handle = model.encoder_norm.register_forward_hook(lambda *_: calls.append(1))
    try:
        model.generate_image_ids(TEXT[:2], cond_scale=2.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(calls) == 1  # one encoder pass for the conditional and null rows together, not one per token


def test_priming_and_callback() -> None:
    model = make_model()
    init = random_image(2, seed=3)
    seen = []
    ids = model.generate_image_ids(
        TEXT[:2], init_image_ids=init, num_init_img_tokens=4, callback=lambda step, _: seen.append(step), top_k=1
    )
    assert torch.equal(ids[:, :4], init[:, :4]) and seen == list(range(5, CONFIG.image_seq_len + 1))


# ---------------------------------------------------------------- config, checkpoints, learning


def test_config_errors_and_defaults() -> None:
    assert (
        DALLEConfig.from_dict({**CONFIG.to_dict(), "architecture": "decoder_only", "encoder_depth": None}).architecture
        == "decoder_only"
    )
    legacy = {k: v for k, v in CONFIG.to_dict().items() if k not in ("architecture", "encoder_depth")}
    assert type(DALLE(DALLEConfig.from_dict(legacy))) is DALLE
    with pytest.raises(ConfigError, match="architecture"):
        replace(CONFIG, architecture="encoder")
    with pytest.raises(ConfigError, match="shift_tokens"):
        replace(CONFIG, shift_tokens=True)
    with pytest.raises(ConfigError, match="encoder_depth"):
        replace(CONFIG, architecture="decoder_only")
    with pytest.raises(ConfigError, match="no text head"):
        make_model().generate_text_ids(TEXT[:, :2])


def test_save_load_round_trip(tmp_path: Path) -> None:
    model = make_model()
    model.save(tmp_path / "ckpt")
    loaded = DALLE.load(tmp_path / "ckpt").eval()
    assert isinstance(loaded, EncoderDecoderDALLE) and loaded.config == CONFIG
    assert isinstance(copy.deepcopy(model), EncoderDecoderDALLE)  # DALLE.__new__ dispatch survives copies
    image = random_image(3)
    with torch.no_grad():
        assert torch.equal(loaded(TEXT, image).image_logits, model(TEXT, image).image_logits)


def test_overfits_two_pairs_and_generates_them_back() -> None:
    torch.manual_seed(0)
    config = replace(
        CONFIG, num_text_tokens=12, dim=64, depth=2, encoder_depth=1, heads=4, dim_head=16, attn_types=("full",)
    )
    model = DALLE(config)
    text = torch.tensor([[3, 7, 0, 0, 0], [5, 0, 0, 0, 0]])
    image = random_image(2, config=config)
    assert not torch.equal(image[0], image[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = model.loss(text, image)
        loss.loss.backward()
        optimizer.step()
        losses.append(float(loss.loss.detach()))
    assert losses[-1] < 0.05 < losses[0]
    for use_cache in (True, False):
        assert torch.equal(model.generate_image_ids(text, top_k=1, use_cache=use_cache), image)
