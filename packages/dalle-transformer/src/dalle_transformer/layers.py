"""One transformer layer's residual branches, and the ways of running a stack of them.

A branch is ``scale * out_norm(fn(shift(norm(x))))`` (DALLE-pytorch's ``LayerScale(PreNorm(PreShiftToken(fn)))``):
``shift`` only with ``shift_tokens``, ``out_norm`` only with ``sandwich_norm``, ``scale`` only with ``layer_scale``.
The attention and feed-forward modules may be shared between layers (``shared_attn_ids``/``shared_ff_ids``): a layer
owns them only when it is the first of its id, so each shared weight is stored once, under its owner's name.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_transformer import native
from dalle_transformer.attention import Attention, PassContext
from dalle_transformer.config import DALLEConfig
from dalle_transformer.decoding_weights import (
    DecodingWeights,
    Projection,
    ProjectionCopies,
    norm_of,
    normalize,
    project,
)
from dalle_transformer.linear import (
    Linear,
    onednn_input_gradient,
    onednn_linear,
    onednn_trains,
    onednn_weight_gradient,
)
from dalle_transformer.masks import AttentionPattern


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``x * gelu(gate)`` for the two halves ``x, gate`` of ``h``'s last dim (DALLE-pytorch's feed-forward
    activation). With autograd it keeps only ``h`` for backward (:class:`_GEGLUFunction`); under ``torch.compile``
    the plain formula, whose saved values and fusion inductor chooses itself (dynamo cannot trace the function's
    backward, which writes into views of one gradient, and would break the graph there). On a float32 CPU tensor,
    forward and backward are one pass each in :mod:`dalle_transformer.native`'s C kernels where they are built."""
    if not (torch.is_grad_enabled() and h.requires_grad):
        library = _native_geglu(h)
        if library is not None:
            return native.geglu(library, h)
        x, gate = h.chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)
    if torch.compiler.is_compiling():
        x, gate = h.chunk(2, dim=-1)
        return x * F.gelu(gate)
    return cast(torch.Tensor, _GEGLUFunction.apply(h))


def _native_geglu(h: torch.Tensor) -> ctypes.CDLL | None:
    """The C kernels' library where it computes GEGLU at ``h`` (:func:`dalle_transformer.native.geglu_takes`)."""
    library = native.library_for(h)
    return library if library is not None and native.geglu_takes(h) else None


class _GEGLUFunction(torch.autograd.Function):
    """GEGLU whose backward recomputes ``gelu(gate)`` from the saved input instead of keeping it (a quarter of the
    feed-forward's activations: 168 MB in a training step of the M benchmark config) and writes the two halves'
    gradients into one tensor (the chunk's backward would concatenate them)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        library = _native_geglu(h)
        if library is not None:
            return native.geglu(library, h)
        x, gate = h.chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors  # type: ignore[attr-defined]
        library = _native_geglu(h)
        if library is not None and grad.dtype == torch.float32:
            return native.geglu_backward(library, h, grad)
        x, gate = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_x, grad_gate = grad_h.chunk(2, dim=-1)
        activated = F.gelu(gate)
        torch.mul(grad, activated, out=grad_x)
        torch.mul(grad, x, out=activated)
        torch.ops.aten.gelu_backward.grad_input(activated, gate, grad_input=grad_gate)
        return grad_h


def linear_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor | None:
    """``geglu(F.linear(x, weight, bias))`` with autograd, whose backward sums the bias's gradient in the pass that
    writes GEGLU's (:class:`_LinearGEGLUFunction`): where oneDNN trains the product (:func:`onednn_trains`) and the
    native kernels compute GEGLU. None elsewhere, and without autograd (nothing to gain)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)
    if not needs_grad or not weight.shape[0] or weight.shape[0] % 2 or not onednn_trains(x, weight, bias):
        return None
    library = native.library_for(x)
    if library is None:
        return None
    flat = x.reshape(-1, x.shape[-1])
    out = cast(torch.Tensor, _LinearGEGLUFunction.apply(flat, weight, bias, library))
    return out.view(*x.shape[:-1], weight.shape[0] // 2)


class _LinearGEGLUFunction(torch.autograd.Function):
    """GEGLU of a linear layer's rows, as :class:`_GEGLUFunction` after oneDNN's product (keeping the input, the
    weight and ``h``), whose backward has the native GEGLU kernel add up the bias's gradient as it writes ``h``'s: a
    sum over that gradient afterwards (the feed-forward's widest, ``2 x 4 x dim`` per position) reads it back from
    memory, 0.8-1.6 ms of a 170-200 ms training step of the S benchmark config (docs/benchmarks.md)."""

    @staticmethod
    def forward(
        ctx: Any, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, library: ctypes.CDLL
    ) -> torch.Tensor:
        h = onednn_linear(flat, weight, bias)  # (no autograd inside forward: the product alone)
        ctx.save_for_backward(flat, weight, h)
        ctx.library = library
        return native.geglu(library, h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, h = ctx.saved_tensors
        grad_bias = h.new_empty(h.shape[1])
        grad_h = native.geglu_backward(ctx.library, h, grad, column_sums=grad_bias)
        needs = ctx.needs_input_grad
        grad_input = onednn_input_gradient(grad_h, weight) if needs[0] else None
        grad_weight = onednn_weight_gradient(grad_h, flat) if needs[1] else None
        return grad_input, grad_weight, grad_bias if needs[2] else None, None


class GEGLU(nn.Module):
    """:func:`geglu` as a module (the feed-forward's ``net[1]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        self.gated = activation == "geglu"
        self.net = nn.Sequential(
            Linear(dim, dim * mult * (2 if self.gated else 1)),
            GEGLU() if self.gated else nn.GELU(),
            nn.Dropout(dropout),
            Linear(dim * mult, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            first, last = self.projections
            h = linear_geglu(x, first.weight, first.bias) if first.bias is not None else None
            if h is not None:
                return cast(torch.Tensor, last(self.net._modules["2"](h)))  # (dropout, then the last projection)
        return cast(torch.Tensor, self.net(x))

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        modules = self.net._modules  # read directly: a decoding step asks for them at every layer
        return cast(nn.Linear, modules["0"]), cast(nn.Linear, modules["3"])

    def one_position(self, x: torch.Tensor, first: Projection, last: Projection) -> torch.Tensor:
        """``forward`` in eval mode for one position per row (``x``: ``[B, dim]`` or ``[B, 1, dim]``) with its two
        projections' tensors (from a KV cache's ``layer_weights``): no Sequential, Linear or Dropout calls, and the
        few-row products of :func:`dalle_transformer.linear.linear`."""
        hidden = project(first, x.reshape(x.shape[0], -1))
        hidden = geglu(hidden) if self.gated else F.gelu(hidden)
        return project(last, hidden).view(x.shape)


def decoding_weights(
    blocks: Sequence[Block],
    layers: Sequence[tuple[Attention | None, FeedForward | None]],
    projection: ProjectionCopies,
) -> list[DecodingWeights]:
    """Each layer's :class:`DecodingWeights` (its block, and the attention and feed-forward modules it runs), its
    projections made by ``projection`` (with the few-row copies decoding steps run faster with)."""
    weights = []
    for block, (attn, ff) in zip(blocks, layers, strict=True):
        assert attn is not None and ff is not None  # the modules a layer runs, its own or its owner's
        ff_in, ff_out = ff.projections
        sandwich, scaled = block.sandwich_norm, block.layer_scale
        weights.append(
            DecodingWeights(
                attn_norm=norm_of(block.attn_norm),
                qkv=projection(attn.to_qkv),
                out=projection(attn.to_out),
                attn_out_norm=norm_of(block.attn_out_norm) if sandwich else None,
                attn_scale=block.attn_scale if scaled else None,
                ff_norm=norm_of(block.ff_norm),
                ff_in=projection(ff_in),
                ff_out=projection(ff_out),
                ff_out_norm=norm_of(block.ff_out_norm) if sandwich else None,
                ff_scale=block.ff_scale if scaled else None,
            )
        )
    return weights


def layer_scaled(h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``h * scale`` (a LayerScale, ``scale``: ``[dim]``). With autograd on a float32 CPU ``h``, its backward is one
    pass of the native kernel (:func:`dalle_transformer.native.scale_backward`) where PyTorch's makes three (the two
    products, and the sum over positions for the scale's gradient)."""
    if torch.is_grad_enabled() and (h.requires_grad or scale.requires_grad) and native.scale_backward_takes(h, scale):
        library = native.library_for(h)
        if library is not None:
            return cast(torch.Tensor, _LayerScaleFunction.apply(h, scale, library))
    return h * scale


class _LayerScaleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, scale: torch.Tensor, library: ctypes.CDLL) -> torch.Tensor:
        ctx.save_for_backward(h, scale)
        ctx.library = library
        return h * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, scale = ctx.saved_tensors
        if grad.dtype != torch.float32:  # (a gradient in another dtype: PyTorch's formulas)
            return grad * scale, (grad * h).sum(tuple(range(h.dim() - 1))), None
        grad_h, grad_scale = native.scale_backward(ctx.library, h, grad, scale)
        return grad_h, grad_scale, None


def layer_scale_init(layer_number: int) -> float:
    """CaiT's initial LayerScale for the ``layer_number``-th layer (1-based), as DALLE-pytorch chooses it."""
    if layer_number <= 18:
        return 0.1
    return 1e-5 if layer_number <= 24 else 1e-6


class Block(nn.Module):
    """Norms and scales of one layer; its attention / feed-forward modules unless an earlier layer shares them."""

    def __init__(self, config: DALLEConfig, index: int, owns_attn: bool, owns_ff: bool) -> None:
        super().__init__()
        dim = config.dim
        self.attn_norm = nn.LayerNorm(dim)
        self.attn: Attention | None = (
            Attention(dim, config.heads, config.dim_head, config.attn_dropout) if owns_attn else None
        )
        self.ff_norm = nn.LayerNorm(dim)
        self.ff: FeedForward | None = (
            FeedForward(dim, config.ff_mult, config.ff_dropout, config.ff_activation) if owns_ff else None
        )
        if config.sandwich_norm:
            self.attn_out_norm = nn.LayerNorm(dim)
            self.ff_out_norm = nn.LayerNorm(dim)
        if config.layer_scale:
            init = layer_scale_init(index + 1)
            self.attn_scale = nn.Parameter(torch.full((dim,), init))
            self.ff_scale = nn.Parameter(torch.full((dim,), init))
        self.sandwich_norm = config.sandwich_norm
        self.layer_scale = config.layer_scale
        self.index = index

    def _shift(self, h: torch.Tensor, context: PassContext, branch: int) -> torch.Tensor:
        shift = context.shift
        if shift is None:
            return h
        if context.cache is None:
            return shift.shift_sequence(h)
        if context.position is not None:
            history = context.cache.write_shift_input_at(self.index, branch, context.position, h)
            return shift.shift_at(history, h, context.position)
        history = context.cache.write_shift_input(self.index, branch, h)
        return shift.shift(history, h, context.start)

    def attention_branch(
        self, x: torch.Tensor, attn: Attention, pattern: AttentionPattern, context: PassContext
    ) -> torch.Tensor:
        h = attn(self._shift(self.attn_norm(x), context, 0), pattern, context, self.index)
        if self.sandwich_norm:
            h = self.attn_out_norm(h)
        return layer_scaled(h, self.attn_scale) if self.layer_scale else h

    def feed_forward_branch(self, x: torch.Tensor, ff: FeedForward, context: PassContext) -> torch.Tensor:
        h = self._shift(self.ff_norm(x), context, 1)
        if context.single:
            assert context.cache is not None and context.cache.layer_weights is not None  # made for single passes
            weights = context.cache.layer_weights[self.index]
            h = ff.one_position(h, weights.ff_in, weights.ff_out)
        else:
            h = ff(h)
        if self.sandwich_norm:
            h = self.ff_out_norm(h)
        return layer_scaled(h, self.ff_scale) if self.layer_scale else h

    def decoding_step(
        self, x: torch.Tensor, attn: Attention, ff: FeedForward, pattern: AttentionPattern, context: PassContext
    ) -> torch.Tensor:
        """The whole layer (``x + f(x)``, then ``+ g(.)``) at the one position of a decoding step
        (``context.single``; ``x``: ``[B, dim]``), reading its tensors from the cache's ``layer_weights``."""
        assert context.cache is not None and context.cache.layer_weights is not None  # made for single passes
        weights = context.cache.layer_weights[self.index]
        h = attn.one_position(
            self._shift_one(normalize(weights.attn_norm, x), context, 0), pattern, context, self.index
        )
        if weights.attn_out_norm is not None:
            h = normalize(weights.attn_out_norm, h)
        # One addcmul for the scaled residual: each operation of a step costs microseconds with cold caches.
        x = torch.addcmul(x, h, weights.attn_scale) if weights.attn_scale is not None else x + h
        h = ff.one_position(self._shift_one(normalize(weights.ff_norm, x), context, 1), weights.ff_in, weights.ff_out)
        if weights.ff_out_norm is not None:
            h = normalize(weights.ff_out_norm, h)
        return torch.addcmul(x, h, weights.ff_scale) if weights.ff_scale is not None else x + h

    def _shift_one(self, h: torch.Tensor, context: PassContext, branch: int) -> torch.Tensor:
        """:meth:`_shift` of one position per row, ``[B, dim]``."""
        if context.shift is None:
            return h
        return self._shift(h[:, None], context, branch)[:, 0]


Branch = Callable[[torch.Tensor], torch.Tensor]


def run_sequential(branches: Sequence[tuple[Branch, Branch]], x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """``x + f(x)`` then ``+ g(.)`` per layer; with ``recompute`` each layer's activations are rebuilt in backward."""
    for f, g in branches:
        if recompute:
            x = checkpoint(_residual_layer, f, g, x, use_reentrant=False)
        else:
            x = _residual_layer(f, g, x)
    return x


def _residual_layer(f: Branch, g: Branch, x: torch.Tensor) -> torch.Tensor:
    x = x + f(x)
    return x + g(x)
