"""A slow, obvious DALLE forward pass for any DALLEConfig, written from DALLE-pytorch 1.6.6's semantics.

It shares only the weights with the model under test: masks come from per-pair Python rules, rotary angles from
per-position formulas, token shifts from per-token loops, attention from explicit ``softmax(QK^T / sqrt(d) + mask) V``
per head, and the layer wiring (shared ids, reversible coupling, sandwich norms, LayerScale) is spelled out here again.
Run it in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dalle_transformer import DALLE, DALLEConfig


def naive_allowed(config: DALLEConfig, kind: str, i: int, j: int) -> bool:
    """May the query at position ``i`` attend to the key at ``j`` (``[BOS, text, image]`` positions)?"""
    text_len, f = config.text_seq_len + 1, config.image_fmap_size
    if j > i:
        return False
    if i < text_len or j < text_len or kind == "full":
        return True
    (qr, qc), (kr, kc) = divmod(i - text_len, f), divmod(j - text_len, f)
    if kind == "axial_row":
        return qr == kr
    if kind == "axial_col":
        return qc == kc
    if kind == "conv_like":
        k, d = config.conv_kernel_size, config.conv_dilation
        return any(kr == qr - a * d and kc == qc - b * d for a in range(k) for b in range(k))
    if kind == "sparse":
        bs = config.sparse_block_size
        back = (i - text_len) // bs - (j - text_len) // bs
        return back < config.sparse_local_blocks or (config.sparse_stride > 0 and back % config.sparse_stride == 0)
    raise ValueError(kind)


def naive_mask(config: DALLEConfig, kind: str, length: int) -> torch.Tensor:
    return torch.tensor([[naive_allowed(config, kind, i, j) for j in range(length)] for i in range(length)])


def naive_rotary_angles(config: DALLEConfig) -> list[list[float]]:
    """Per position, the angle of each rotated feature (each pair's angle twice), computed one by one.

    Products are rounded to float32 as DALLE-pytorch computes them (the text rotary of image tokens sits at position
    8192, where float32 rounding is visible).
    """
    f32 = torch.float32
    r = config.dim_head // 3
    pairs = r // 2
    text_len, f = config.text_seq_len + 1, config.image_fmap_size
    lang = [float(1.0 / torch.tensor(10000.0, dtype=f32) ** torch.tensor(2 * m / r, dtype=f32)) for m in range(pairs)]
    pixel = [(1.0 + 4.0 * m / (pairs - 1) if pairs > 1 else 1.0) * math.pi for m in range(pairs)]
    axis = [-1.0 + 2.0 * a / (f - 1) if f > 1 else -1.0 for a in range(f)]

    def angles(position: float, freqs: list[float]) -> list[float]:
        out = []
        for freq in freqs:
            angle = float(torch.tensor(position, dtype=f32) * torch.tensor(freq, dtype=f32))
            out += [angle, angle]
        return out

    table = []
    for p in range(config.total_seq_len):
        if p < text_len:
            row = angles(p, lang) + angles(-10.0, pixel) + angles(-10.0, pixel)
        else:
            img_row, img_col = divmod(p - text_len, f)
            row = angles(8192.0, lang) + angles(axis[img_row], pixel) + angles(axis[img_col], pixel)
        table.append(row)
    return table


def naive_rotate(x: torch.Tensor, angles: list[list[float]]) -> torch.Tensor:
    """``x``: ``[n, D]``; rotate pairs ``(x[2m], x[2m+1])`` of position ``p`` by ``angles[p][2m]``."""
    out = x.clone()
    for p in range(x.shape[0]):
        for m in range(0, len(angles[p]), 2):
            c, s = math.cos(angles[p][m]), math.sin(angles[p][m])
            x0, x1 = x[p, m], x[p, m + 1]
            out[p, m], out[p, m + 1] = x0 * c - x1 * s, x1 * c + x0 * s
    return out


def naive_shift(config: DALLEConfig, h: torch.Tensor) -> torch.Tensor:
    """Token shift of one sequence ``[n, dim]``."""
    text_len, f, dim = config.text_seq_len + 1, config.image_fmap_size, config.dim
    half, quarter = math.ceil(dim / 2), math.ceil(dim / 4)
    out = h.clone()
    for p in range(h.shape[0]):
        if p < text_len:
            out[p, :half] = h[p - 1, :half] if p > 0 else 0.0
        else:
            row, col = divmod(p - text_len, f)
            out[p, :quarter] = h[p - f, :quarter] if row > 0 else 0.0
            out[p, quarter : 2 * quarter] = h[p - 1, quarter : 2 * quarter] if col > 0 else 0.0
    return out


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _owner(ids: tuple[int, ...] | None, depth: int, index: int) -> int:
    cycled = list(range(depth)) if ids is None else [ids[i % len(ids)] for i in range(depth)]
    return cycled.index(cycled[index])


def naive_heads_attention(
    h: torch.Tensor,
    qkv_weight: torch.Tensor,
    out_weight: torch.Tensor,
    out_bias: torch.Tensor,
    heads: int,
    dim_head: int,
    mask: torch.Tensor,
    angles: list[list[float]] | None,
) -> torch.Tensor:
    """Multi-head attention over ``h`` ``[L, dim]``, one head at a time: ``softmax(QK^T / sqrt(d) + mask) V``, queries,
    keys and values rotated by ``angles`` (per position) when given, as DALLE-pytorch's rotary does."""
    inner = heads * dim_head
    qkv = h @ qkv_weight.T
    outputs = []
    for head in range(heads):
        part = slice(head * dim_head, (head + 1) * dim_head)
        q, k, v = (qkv[:, offset + part.start : offset + part.stop] for offset in (0, inner, 2 * inner))
        if angles is not None:
            q, k, v = naive_rotate(q, angles), naive_rotate(k, angles), naive_rotate(v, angles)
        scores = (q @ k.T / math.sqrt(dim_head)).masked_fill(~mask, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v)
    return torch.cat(outputs, dim=-1) @ out_weight.T + out_bias


def naive_layers(
    x: torch.Tensor, depth: int, reversible: bool, branch: Callable[[int, str, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``depth`` layers of ``branch(layer, "attn" | "ff", h)`` residual branches, sequential or reversible (two
    streams coupled as ``x1 += attn(x2)``, ``x2 += ff(x1)``, averaged at the end)."""
    if reversible:
        x1, x2 = x, x
        for layer in range(depth):
            x1 = x1 + branch(layer, "attn", x2)
            x2 = x2 + branch(layer, "ff", x1)
        return (x1 + x2) / 2
    for layer in range(depth):
        x = x + branch(layer, "attn", x)
        x = x + branch(layer, "ff", x)
    return x


def naive_logits(model: DALLE, text_ids: torch.Tensor, image_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text_logits [B, T, V_text], image_logits [B, N, V_image])`` for full-length text and image ids."""
    c = model.config
    t, n, dim = c.text_seq_len, c.image_seq_len, c.dim
    v_text = c.num_text_tokens + t
    length = t + n
    text_table = model.to_logits.weight[:v_text] if c.share_input_output_emb else model.text_emb.weight
    image_table = model.to_logits.weight[v_text:] if c.share_input_output_emb else model.image_emb.weight
    kinds = [c.attn_types[i % len(c.attn_types)] for i in range(c.depth)]
    masks = {kind: naive_mask(c, kind, length) for kind in set(kinds)}
    angles = naive_rotary_angles(c) if c.rotary_emb else None
    text_outs, image_outs = [], []
    for b in range(text_ids.shape[0]):
        text = [int(v) if int(v) != c.text_pad_id else c.num_text_tokens + i for i, v in enumerate(text_ids[b])]
        x = torch.zeros(length, dim, dtype=torch.float64)
        x[0] = model.bos
        for i in range(t):
            x[1 + i] = text_table[text[i]] + (0 if c.rotary_emb else model.text_pos_emb.weight[i])
        for j in range(n - 1):
            row, col = divmod(j, c.image_fmap_size)
            position = 0 if c.rotary_emb else model.image_row_emb.weight[row] + model.image_col_emb.weight[col]
            x[1 + t + j] = image_table[int(image_ids[b, j])] + position

        def branch(i: int, kind: str, h: torch.Tensor) -> torch.Tensor:
            block = model.blocks[i]
            norm = block.attn_norm if kind == "attn" else block.ff_norm
            h = layer_norm(h, norm)
            if c.shift_tokens:
                h = naive_shift(c, h)
            if kind == "attn":
                attn = model.blocks[_owner(c.shared_attn_ids, c.depth, i)].attn
                h = attention(h, attn, masks[kinds[i]])
            else:
                ff = model.blocks[_owner(c.shared_ff_ids, c.depth, i)].ff.net
                hidden = h @ ff[0].weight.T + ff[0].bias
                if c.ff_activation == "geglu":
                    value, gate = hidden.chunk(2, dim=-1)
                    hidden = value * gelu(gate)
                else:
                    hidden = gelu(hidden)
                h = hidden @ ff[3].weight.T + ff[3].bias
            if c.sandwich_norm:
                h = layer_norm(h, block.attn_out_norm if kind == "attn" else block.ff_out_norm)
            if c.layer_scale:
                h = h * (block.attn_scale if kind == "attn" else block.ff_scale)
            return h

        def attention(h: torch.Tensor, attn: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
            weights = (attn.to_qkv.weight, attn.to_out.weight, attn.to_out.bias)
            return naive_heads_attention(h, *weights, c.heads, c.dim_head, mask, angles)

        x = naive_layers(x, c.depth, c.reversible, branch)
        if c.stable:
            x = x / x.max(dim=-1, keepdim=True).values
        logits = layer_norm(x, model.norm) @ model.to_logits.weight.T + model.to_logits.bias
        text_outs.append(logits[:t, :v_text])
        image_outs.append(logits[t:, v_text:])
    return torch.stack(text_outs), torch.stack(image_outs)
