"""Attention computations for one layer, all driven by the layer's :class:`AttentionPattern`.

``q``, ``k``, ``v`` are ``[B, H, n, D]`` for positions ``0..n`` (queries not yet scaled). Every function returns
``[B, H, n_queries, D]``:

- :func:`attend_dense`: the reference, SDPA with the pattern's full boolean mask.
- :func:`attend_causal`: ``full`` over a whole sequence in :mod:`dalle_transformer.native`'s kernels, forward and
  backward, on CPUs they run on (``None`` elsewhere).
- :func:`attend_grouped`: the other types over a whole sequence in the same kernels, each image query scoring the
  text keys and its group's image keys (:func:`dalle_transformer.plans.kernel_groups`; ``None`` where they do not
  run).
- :func:`attend_efficient`: ``full`` on SDPA with ``is_causal``; the other types as causal text attention plus a
  :class:`GroupedPlan` over the image queries (scores only against the text and the gathered keys), in PyTorch's
  operators (where :func:`attend_grouped` does not run).
- :func:`attend_flex`: FlexAttention with a block mask built from the same ``mask_mod`` (fused on CUDA).
- :func:`attend_decode`: one new query against only the keys its mask row allows, gathered from the KV cache (on
  the CPU in :mod:`dalle_transformer.native`'s kernel where it is built).
- :func:`attend_decode_at`: the same for a query whose position is a device tensor (compiled and CUDA-graph steps).
- :func:`attend_rows`: several new queries after a non-empty cache (dense mask rows; not on the hot path).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from dalle_core.errors import ShapeError
from dalle_transformer import native
from dalle_transformer.masks import AttentionPattern, cached_table
from dalle_transformer.plans import GroupBucket, decode_keys, grouped_plan, kernel_groups


def softmax(scores: torch.Tensor, stable: bool) -> torch.Tensor:
    """Softmax over the last dim; ``stable`` is DALLE-pytorch's variant (max taken on ``scores / 32**2``)."""
    if not stable:
        return torch.softmax(scores, dim=-1)
    alpha = 32.0**2
    scaled = scores / alpha
    return ((scaled - scaled.amax(dim=-1, keepdim=True).detach()) * alpha).softmax(dim=-1)


def attend_dense(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, dropout_p: float = 0.0
) -> torch.Tensor:
    mask = pattern.square_mask(q.shape[-2], device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attend_causal(qkv: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor | None:
    """Causal attention over ``q, k, v = qkv`` (``[3, B, H, n, D]``), what ``attend_efficient`` computes for the
    ``full`` pattern, in the native library's kernels (with autograd, and under ``torch.compile`` as an operator it
    keeps whole); None where they do not take ``qkv`` (not built, another CPU, device or dtype). Dropout draws its
    seed from PyTorch's default generator (the kept probabilities differ from SDPA's)."""
    return _attend_native(qkv, dropout_p, None)


def attend_grouped(qkv: torch.Tensor, pattern: AttentionPattern, dropout_p: float = 0.0) -> torch.Tensor | None:
    """What ``attend_efficient`` computes for a non-``full`` pattern over a sequence longer than its text part
    (``qkv`` as for :func:`attend_causal`), in the native library's kernels: the text queries causally, each image
    query against the text keys and the keys of its group in :func:`kernel_groups` under the pattern's mask. None
    where the kernels do not take ``qkv``."""
    return _attend_native(qkv, dropout_p, pattern)


@torch.compiler.assume_constant_result
def _native_attention_runs() -> bool:
    """Whether the native library is built here and runs its attention kernels (AVX-512): a fact of the process,
    which ``torch.compile`` reads once instead of tracing the library's loading."""
    library = native.default_library()
    return library is not None and native.wide_kernels_run(library)


def _attend_native(qkv: torch.Tensor, dropout_p: float, pattern: AttentionPattern | None) -> torch.Tensor | None:
    # Traced values are not plain tensors, and their strides are settled when the compiled code runs (the operator
    # makes the last dim contiguous where it is not).
    compiling = torch.compiler.is_compiling()
    takes = native.causal_attention_fits(qkv) if compiling else native.causal_attention_takes(qkv)
    if not takes or not _native_attention_runs():
        return None
    kind, *sizes = dataclasses.astuple(pattern) if pattern is not None else ("full",)
    # The seed as a tensor: a compiled graph then draws a new one at every call, where an int would be baked in.
    seed = torch.randint(2**32, (), dtype=torch.int64) if dropout_p > 0.0 else torch.zeros((), dtype=torch.int64)
    return _causal_attention(qkv, dropout_p, seed, kind, sizes)[0]


def _kernel_inputs(
    qkv: torch.Tensor, kind: str, sizes: list[int]
) -> tuple[torch.Tensor, native.AttentionGroups | None]:
    """The operators' ``qkv`` as the kernels take it (checked: the operators can be called directly) and the
    pattern's groups (None for ``"full"``)."""
    qkv = qkv if qkv.stride(4) == 1 else qkv.contiguous()
    if not native.causal_attention_takes(qkv):
        raise ShapeError(f"causal_attention: expected a float32 CPU qkv [3, B, H, n, D], got {qkv.dtype} "
                         f"{list(qkv.shape)} on {qkv.device}")  # fmt: skip
    length = qkv.shape[3]
    return qkv, (None if kind == "full" else kernel_groups(AttentionPattern(kind, *sizes), length))


# The kernels as operators (``dalle_transformer::causal_attention`` and its backward), so that torch.compile calls
# them as they are (it cannot trace their ctypes calls) and eager code runs the same: ``kind, sizes`` are the
# pattern's fields (``"full"``: causal attention), ``seed`` an int64 scalar tensor.
@torch.library.custom_op("dalle_transformer::causal_attention", mutates_args=())
def _causal_attention(
    qkv: torch.Tensor, dropout_p: float, seed: torch.Tensor, kind: str, sizes: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    qkv, groups = _kernel_inputs(qkv, kind, sizes)
    return native.causal_attention(native.required_library(), qkv, dropout_p, int(seed), groups)


@_causal_attention.register_fake
def _(qkv: torch.Tensor, *_: object) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, n, dim = qkv.shape[1:]
    return qkv.new_empty(batch, n, heads, dim).transpose(1, 2), qkv.new_empty(batch, heads, n)  # as the kernel's


@torch.library.custom_op("dalle_transformer::causal_attention_backward", mutates_args=())
def _causal_attention_backward(
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    kind: str,
    sizes: list[int],
) -> torch.Tensor:
    qkv, groups = _kernel_inputs(qkv, kind, sizes)
    library = native.required_library()
    return native.causal_attention_backward(library, qkv, out, lse, grad, dropout_p, int(seed), groups)


@_causal_attention_backward.register_fake
def _(qkv: torch.Tensor, *_: object) -> torch.Tensor:
    batch, heads, n, dim = qkv.shape[1:]
    return qkv.new_empty(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)  # the layout of the kernel's gradient


def _save_for_backward(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    qkv, ctx.dropout_p, seed, ctx.kind, ctx.sizes = inputs
    ctx.save_for_backward(qkv, *output, seed)


def _backward(ctx: Any, grad: torch.Tensor, _grad_lse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    qkv, out, lse, seed = ctx.saved_tensors
    grad_qkv = _causal_attention_backward(qkv, out, lse, grad, ctx.dropout_p, seed, ctx.kind, ctx.sizes)
    return grad_qkv, None, None, None, None


_causal_attention.register_autograd(_backward, setup_context=_save_for_backward)


def attend_efficient(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: AttentionPattern,
    dropout_p: float = 0.0,
    stable: bool = False,
) -> torch.Tensor:
    n, text_len = q.shape[-2], pattern.text_len
    if pattern.kind == "full" or n <= text_len:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    text_out = F.scaled_dot_product_attention(
        q[:, :, :text_len], k[:, :, :text_len], v[:, :, :text_len], dropout_p=dropout_p, is_causal=True
    )
    image_out = _attend_grouped(q, k, v, pattern, dropout_p, stable)
    return torch.cat([text_out, image_out[:, :, : n - text_len]], dim=2)


def _attend_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern, dropout_p: float, stable: bool
) -> torch.Tensor:
    """Image queries' attention ``[B, H, N, D]`` (raster order, all ``N`` cells) through the grouped plan."""
    n, dim = q.shape[-2], q.shape[-1]
    text_len, cells = pattern.text_len, pattern.fmap_size**2
    plan = grouped_plan(pattern, q.device)

    # Image cells padded to N + 1 (cells not in this sequence and the dummy cell are zeros; causality keeps real
    # queries from ever seeing them, and the outputs of queries beyond the sequence are dropped by the caller).
    def image_cells(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t[:, :, text_len:], (0, 0, 0, cells + 1 - (n - text_len)))

    q_img, k_img, v_img = image_cells(q * dim**-0.5), image_cells(k), image_cells(v)
    k_text, v_text = k[:, :, :text_len], v[:, :, :text_len]
    outs = [_attend_bucket(q_img, k_img, v_img, k_text, v_text, bucket, dropout_p, stable) for bucket in plan.buckets]
    return torch.cat(outs, dim=2).index_select(2, plan.order)


def _attend_bucket(
    q_img: torch.Tensor,
    k_img: torch.Tensor,
    v_img: torch.Tensor,
    k_text: torch.Tensor,
    v_text: torch.Tensor,
    bucket: GroupBucket,
    dropout_p: float,
    stable: bool,
) -> torch.Tensor:
    """``[B, H, G * S, D]``: each group's queries against all text keys and the group's gathered image keys."""
    text_len = k_text.shape[-2]
    q_groups = _gather_cells(q_img, bucket.query_cells)  # [B, H, G, S, D]
    k_groups, v_groups = _gather_cells(k_img, bucket.key_cells), _gather_cells(v_img, bucket.key_cells)  # [B,H,G,M,D]
    text_scores = (q_groups.flatten(2, 3) @ k_text.transpose(-1, -2)).unflatten(2, bucket.query_cells.shape)
    image_scores = (q_groups @ k_groups.transpose(-1, -2)).masked_fill(~bucket.mask, float("-inf"))
    probs = softmax(torch.cat([text_scores, image_scores], dim=-1), stable)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    text_probs, image_probs = probs[..., :text_len], probs[..., text_len:]
    out = (text_probs.flatten(2, 3) @ v_text).unflatten(2, bucket.query_cells.shape) + image_probs @ v_groups
    return out.flatten(2, 3)


def _gather_cells(t: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    # index_select (backward: index_add) is much faster on CPU than advanced indexing (backward: index_put).
    return t.index_select(2, cells.flatten()).unflatten(2, cells.shape)


@cached_table
def _block_mask(pattern: AttentionPattern, length: int, device: torch.device):  # -> torch's BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):  # FlexAttention's signature
        return pattern.allowed(q_idx, kv_idx)

    return create_block_mask(mask_mod, None, None, length, length, device=device)


@functools.cache
def _flex_attention(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: AttentionPattern) -> torch.Tensor:
    """FlexAttention (no dropout): compiled into a fused block-sparse kernel on CUDA, eager elsewhere (for tests)."""
    block_mask = _block_mask(pattern, q.shape[-2], q.device)
    flex = _flex_attention(q.device.type == "cuda")
    if q.device.type != "cuda":
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            return flex(q, k, v, block_mask=block_mask)
    return flex(q, k, v, block_mask=block_mask)


def attend_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pattern: AttentionPattern,
    position: int,
    backend: str = "auto",
) -> torch.Tensor:
    """One query (``q``: ``[B, H, 1, D]``) at ``position``; ``keys``/``values``: the cache up to ``position``. The
    ``auto`` backend computes it with :mod:`dalle_transformer.native`'s kernel where that takes it, else SDPA."""
    index = decode_keys(pattern, position, q.device)
    if index is not None:
        keys, values = keys[:, :, index], values[:, :, index]
    library = native.library_for(q) if backend == "auto" else None
    if library is not None and native.decode_attention_takes(q, keys, values):
        return native.attend(library, q, keys, values)
    return F.scaled_dot_product_attention(q, keys, values)


def attend_decode_at(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pattern: AttentionPattern,
    position: torch.Tensor,
    backend: str = "auto",
) -> torch.Tensor:
    """One query (``q``: ``[B, H, 1, D]``) at ``position`` (``int64[1]`` on the device) against a whole cache
    (``[B, H, max_len, D]``).

    On CUDA it reads every cached key under the pattern's mask row for that position: no host-side index, so it can
    be captured in a CUDA graph. Elsewhere it is one call of the custom op ``dalle_transformer::attend_decode_cached``
    (:func:`attend_decode` on the allowed keys, the position read on the host), which ``torch.compile`` leaves
    opaque: a compiled step then reads only the keys the mask allows, at every position, without recompiling.
    """
    if q.is_cuda:
        return attend_whole_cache(q, keys, values, pattern, position)
    kind, *sizes = dataclasses.astuple(pattern)
    return _attend_decode_cached(q, keys, values, position, kind, sizes, backend)


@torch.library.custom_op("dalle_transformer::attend_decode_cached", mutates_args=())
def _attend_decode_cached(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: torch.Tensor,
    kind: str,
    sizes: list[int],
    backend: str,
) -> torch.Tensor:
    end = int(position) + 1
    out = attend_decode(q, keys[:, :, :end], values[:, :, :end], AttentionPattern(kind, *sizes), end - 1, backend)
    return out.contiguous()  # the layout its fake promises, whatever q's


@_attend_decode_cached.register_fake
def _(q: torch.Tensor, *_: object) -> torch.Tensor:  # the output is shaped as q; the rest only picks keys
    return q.new_empty(q.shape)


def attend_whole_cache(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pattern: AttentionPattern, position: torch.Tensor
) -> torch.Tensor:
    """:func:`attend_decode_at` on CUDA: every cached key under the mask row of ``position``, computed on the device
    from the position (a few hundred comparisons; no table, so nothing for ``torch.compile`` to look up)."""
    mask = pattern.dense_mask(position, keys.shape[-2])  # [1, max_len]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def attend_rows(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pattern: AttentionPattern, start: int, dropout_p: float
) -> torch.Tensor:
    """Queries at positions ``start..start+n`` against keys ``0..start+n`` with the pattern's mask rows."""
    positions = torch.arange(start, start + q.shape[-2], device=q.device)
    mask = pattern.dense_mask(positions, keys.shape[-2])
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout_p)


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def dense_pairs(length: int) -> int:
    return length * length


def tile_pairs(mask: torch.Tensor, tile: int = 128) -> int:
    """Pairs in the ``tile x tile`` blocks that hold any allowed pair (what a block-sparse kernel computes)."""
    rows, cols = math.ceil(mask.shape[0] / tile), math.ceil(mask.shape[1] / tile)
    padded = F.pad(mask, (0, cols * tile - mask.shape[1], 0, rows * tile - mask.shape[0]))
    occupied = padded.view(rows, tile, cols, tile).any(dim=3).any(dim=1)
    return int(occupied.sum()) * tile * tile
