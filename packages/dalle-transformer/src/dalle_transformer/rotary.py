"""Rotary position embeddings as in DALLE-pytorch 1.6.6 (``rotary_emb=True``).

Each head's first ``3 * 2 * (dim_head // 3 // 2)`` features are rotated in interleaved pairs ``(x0, x1)``, in three
equal groups:

1. text rotary ("lang" frequencies ``1 / 10000 ** (2i / r)``, ``r = dim_head // 3``): BOS and text get positions
   ``0..T``; image tokens all get the far position 8192;
2. image rows and 3. image columns ("pixel" frequencies ``linspace(1, 5, r // 2) * pi``) at ``linspace(-1, 1, fmap)``;
   the text part gets the axial position -10 on both.

As in DALLE-pytorch, queries, keys *and values* are rotated. Angles are computed in float32 the way it does; cos and
sin are kept as buffers.
"""

from __future__ import annotations

import math

import torch


def rotary_angles(text_seq_len: int, fmap_size: int, dim_head: int) -> torch.Tensor:
    """``float32[T + 1 + fmap**2, R]`` rotation angles per position (each frequency twice, for its pair)."""
    rot = dim_head // 3
    text_len, image_len = text_seq_len + 1, fmap_size**2
    lang = 1.0 / (10000 ** (torch.arange(0, rot, 2)[: rot // 2].float() / rot))
    pixel = torch.linspace(1.0, 10 / 2, rot // 2) * math.pi

    def angles(positions: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return (positions.float()[:, None] * freqs).repeat_interleave(2, dim=-1)

    text_positions = torch.cat([torch.arange(text_len).float(), torch.full((image_len,), 8192.0)])
    text_part = angles(text_positions, lang)
    axis = angles(torch.linspace(-1.0, 1.0, fmap_size), pixel)  # [fmap, R/3]
    image_rows = axis[:, None, :].expand(fmap_size, fmap_size, -1).reshape(image_len, -1)
    image_cols = axis[None, :, :].expand(fmap_size, fmap_size, -1).reshape(image_len, -1)
    text_axial = angles(torch.full((text_len,), -10.0), pixel)
    rows = torch.cat([text_axial, image_rows])
    cols = torch.cat([text_axial, image_cols])
    return torch.cat([text_part, rows, cols], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x`` (``[..., n, D]``) by per-position ``cos``/``sin``."""
    width = cos.shape[-1]
    head, tail = x[..., :width], x[..., width:]
    pairs = head.unflatten(-1, (-1, 2))
    rotated_half = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return torch.cat([head * cos + rotated_half * sin, tail], dim=-1)
