"""Our forward pass and loss against a naive, independent implementation sharing the same weights.

The reference does everything the slow, obvious way (DALLE-pytorch style): Python loops over heads, explicit
``softmax(QK^T / sqrt(d) + causal mask) V``, logits over the whole vocabulary with ``-inf`` where a position may not
predict, and per-position padding ids built with Python loops.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dalle_transformer import DALLE, DALLEConfig

CONFIG = DALLEConfig(
    num_text_tokens=11,
    text_seq_len=5,
    num_image_tokens=13,
    image_fmap_size=3,
    text_pad_id=2,
    dim=24,
    depth=2,
    heads=3,
    dim_head=8,
    ff_mult=2,
    loss_img_weight=3.0,
)


def random_model(config: DALLEConfig = CONFIG, seed: int = 0) -> DALLE:
    """A model whose every parameter (LayerNorms included) is random and O(1), so logits are far from trivial."""
    torch.manual_seed(seed)
    model = DALLE(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.4)
    return model


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def naive_logits(model: DALLE, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary logits ``[B, T + N, V]`` (masked with -inf) and the targets ``[B, T + N]`` in that vocabulary."""
    c = model.config
    batch, t, n = text_ids.shape[0], c.text_seq_len, c.image_seq_len
    text_vocab = c.num_text_tokens + t
    # Pad to text_seq_len, then give each padding position its own token.
    text = [[int(v) for v in row] + [c.text_pad_id] * (t - len(row)) for row in text_ids]
    text = [[c.num_text_tokens + i if v == c.text_pad_id else v for i, v in enumerate(row)] for row in text]
    targets = torch.tensor([row + [text_vocab + int(v) for v in image_ids[b]] for b, row in enumerate(text)])

    x = torch.zeros(batch, t + n, c.dim)
    for b in range(batch):
        x[b, 0] = model.bos
        for i in range(t):
            x[b, 1 + i] = model.text_emb.weight[text[b][i]] + model.text_pos_emb.weight[i]
        for j in range(n - 1):
            row, col = divmod(j, c.image_fmap_size)
            x[b, 1 + t + j] = (
                model.image_emb.weight[int(image_ids[b, j])]
                + model.image_row_emb.weight[row]
                + model.image_col_emb.weight[col]
            )

    length = t + n
    causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    inner = c.heads * c.dim_head
    for block in model.blocks:
        h = layer_norm(x, block.attn_norm)
        qkv = h @ block.attn.to_qkv.weight.T
        q, k, v = qkv[..., :inner], qkv[..., inner : 2 * inner], qkv[..., 2 * inner :]
        heads = []
        for head in range(c.heads):
            part = slice(head * c.dim_head, (head + 1) * c.dim_head)
            scores = q[..., part] @ k[..., part].transpose(-1, -2) / math.sqrt(c.dim_head) + causal
            heads.append(torch.softmax(scores, dim=-1) @ v[..., part])
        x = x + torch.cat(heads, dim=-1) @ block.attn.to_out.weight.T + block.attn.to_out.bias
        h = layer_norm(x, block.ff_norm)
        first, last = block.ff.net[0], block.ff.net[-1]
        hidden = h @ first.weight.T + first.bias
        hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))
        x = x + hidden @ last.weight.T + last.bias

    logits = layer_norm(x, model.norm) @ model.to_logits.weight.T + model.to_logits.bias
    allowed = torch.zeros(length, logits.shape[-1], dtype=torch.bool)
    allowed[:t, :text_vocab] = True  # positions 0..T-1 predict text tokens
    allowed[t:, text_vocab:] = True  # positions T..T+N-1 predict image tokens
    return logits.masked_fill(~allowed, float("-inf")), targets


def sample_inputs(config: DALLEConfig = CONFIG) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    pad = config.text_pad_id
    text = torch.tensor([[5, 7, 1, pad, pad], [10, pad, 3, 0, pad]])  # a pad id in the middle is per-position too
    image = torch.randint(0, config.num_image_tokens, (2, config.image_seq_len), generator=generator)
    return text, image


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_naive_reference(seed: int) -> None:
    model = random_model(seed=seed)
    text, image = sample_inputs()
    with torch.no_grad():
        out = model(text, image)
        reference, _ = naive_logits(model, text, image)
    t, text_vocab = CONFIG.text_seq_len, CONFIG.num_text_logits
    assert out.text_logits.shape == (2, t, text_vocab)
    assert out.image_logits.shape == (2, CONFIG.image_seq_len, CONFIG.num_image_tokens)
    assert out.text_logits.abs().max() > 1.0  # non-trivial values, so the tolerance means something
    torch.testing.assert_close(out.text_logits, reference[:, :t, :text_vocab], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.image_logits, reference[:, t:, text_vocab:], rtol=1e-5, atol=1e-5)
    # The reference's masked entries are exactly the logits we never compute.
    assert bool(torch.isinf(reference[:, :t, text_vocab:]).all()) and bool(
        torch.isinf(reference[:, t:, :text_vocab]).all()
    )


def test_loss_matches_naive_reference() -> None:
    model = random_model()
    text, image = sample_inputs()
    result = model.loss(text, image)
    with torch.no_grad():
        reference, targets = naive_logits(model, text, image)
    t = CONFIG.text_seq_len
    text_loss = F.cross_entropy(reference[:, :t].flatten(0, 1), targets[:, :t].flatten())
    image_loss = F.cross_entropy(reference[:, t:].flatten(0, 1), targets[:, t:].flatten())
    w = CONFIG.loss_img_weight
    torch.testing.assert_close(result.text_loss.detach(), text_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.image_loss.detach(), image_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.loss.detach(), (text_loss + w * image_loss) / (w + 1), rtol=1e-5, atol=1e-5)
    # The loss is differentiable down to every parameter that the sequence touches.
    result.loss.backward()
    assert model.bos.grad is not None and model.bos.grad.abs().sum() > 0
    assert model.to_logits.weight.grad is not None


def test_short_text_is_padded_with_text_pad_id() -> None:
    model = random_model()
    text, image = sample_inputs()
    short = text[:1, :3]
    padded = torch.cat([short, torch.full((1, 2), CONFIG.text_pad_id)], dim=1)
    with torch.no_grad():
        a, b = model(short, image[:1]), model(padded, image[:1])
    assert torch.equal(a.text_logits, b.text_logits) and torch.equal(a.image_logits, b.image_logits)


def test_causality_image_tokens() -> None:
    model = random_model()
    text, image = sample_inputs()
    with torch.no_grad():
        base = model(text, image)
        for j in (0, 4, CONFIG.image_seq_len - 2):
            changed = image.clone()
            changed[:, j] = (changed[:, j] + 1) % CONFIG.num_image_tokens
            out = model(text, changed)
            # image_logits[:, i] predicts image token i from tokens < i: positions <= j cannot see token j.
            torch.testing.assert_close(out.image_logits[:, : j + 1], base.image_logits[:, : j + 1], rtol=0, atol=1e-6)
            torch.testing.assert_close(out.text_logits, base.text_logits, rtol=0, atol=1e-6)
            assert (out.image_logits[:, j + 1 :] - base.image_logits[:, j + 1 :]).abs().amax(-1).min() > 1e-4
        # The last image token is only a target: it is never an input.
        changed = image.clone()
        changed[:, -1] = (changed[:, -1] + 1) % CONFIG.num_image_tokens
        assert torch.equal(model(text, changed).image_logits, base.image_logits)


def test_last_text_token_conditions_first_image_token() -> None:
    model = random_model()
    text, image = sample_inputs()
    changed = text.clone()
    changed[:, -1] = 4  # a real token where there was padding
    with torch.no_grad():
        base, out = model(text, image), model(changed, image)
    # Text logits i predict text token i + 1 from tokens <= i: the last text token is only a text target...
    torch.testing.assert_close(out.text_logits, base.text_logits, rtol=0, atol=1e-6)
    # ...but it is the input that predicts the first image token.
    assert (out.image_logits[:, 0] - base.image_logits[:, 0]).abs().max() > 1e-3


def test_padding_gets_one_token_per_position() -> None:
    model = random_model()
    v, pad = CONFIG.num_text_tokens, CONFIG.text_pad_id
    short = torch.tensor([[5, pad, pad, pad, pad]])
    longer = torch.tensor([[5, 9, 4, pad, pad]])
    assert model.prepare_text(short).tolist() == [[5, v + 1, v + 2, v + 3, v + 4]]
    assert model.prepare_text(longer).tolist() == [[5, 9, 4, v + 3, v + 4]]
    assert model.prepare_text(torch.tensor([[5]])).tolist() == [[5, v + 1, v + 2, v + 3, v + 4]]
    with torch.no_grad():
        emb_short = model.text_emb(model.prepare_text(short))[0]
        emb_longer = model.text_emb(model.prepare_text(longer))[0]
    # The padded positions of the shorter text are all different tokens (not one shared pad embedding)...
    for i in range(1, 5):
        for j in range(i + 1, 5):
            assert not torch.allclose(emb_short[i], emb_short[j])
    # ...and the same position gets the same padding token whatever the text's length.
    assert torch.equal(emb_short[3:], emb_longer[3:])
    assert not torch.allclose(emb_short[1], emb_longer[1])


def test_padded_text_targets_are_per_position_ids() -> None:
    model = random_model()
    text, image = sample_inputs()
    result = model.loss(text, image)
    with torch.no_grad():
        logits = model(text, image).text_logits
    targets = model.prepare_text(text)
    assert int(targets[0, 3]) == CONFIG.num_text_tokens + 3 and int(targets[1, 1]) == CONFIG.num_text_tokens + 1
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(result.text_loss.detach(), expected)
    # Using the raw pad id as the target at padding positions would be a different loss.
    assert not torch.allclose(F.cross_entropy(logits.flatten(0, 1), text.flatten()), expected)
