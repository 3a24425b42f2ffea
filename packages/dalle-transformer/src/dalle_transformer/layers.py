"""One transformer layer's residual branches, and the ways of running a stack of them.

A branch is ``scale * out_norm(fn(shift(norm(x))))`` (DALLE-pytorch's ``LayerScale(PreNorm(PreShiftToken(fn)))``):
``shift`` only with ``shift_tokens``, ``out_norm`` only with ``sandwich_norm``, ``scale`` only with ``layer_scale``.
The attention and feed-forward modules may be shared between layers (``shared_attn_ids``/``shared_ff_ids``): a layer
owns them only when it is the first of its id, so each shared weight is stored once, under its owner's name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_transformer.attention import Attention, PassContext
from dalle_transformer.config import DALLEConfig
from dalle_transformer.linear import Linear, few_row_copy, linear
from dalle_transformer.masks import AttentionPattern


def geglu(h: torch.Tensor) -> torch.Tensor:
    """``x * gelu(gate)`` for the two halves ``x, gate`` of ``h``'s last dim (DALLE-pytorch's feed-forward
    activation). With autograd it keeps only ``h`` for backward (:class:`_GEGLUFunction`); under ``torch.compile``
    the plain formula, whose saved values and fusion inductor chooses itself (dynamo cannot trace the function's
    backward, which writes into views of one gradient, and would break the graph there)."""
    x, gate = h.chunk(2, dim=-1)
    if not (torch.is_grad_enabled() and h.requires_grad):
        return F.gelu(gate).mul_(x)
    if torch.compiler.is_compiling():
        return x * F.gelu(gate)
    return cast(torch.Tensor, _GEGLUFunction.apply(h))


class _GEGLUFunction(torch.autograd.Function):
    """GEGLU whose backward recomputes ``gelu(gate)`` from the saved input instead of keeping it (a quarter of the
    feed-forward's activations: 168 MB in a training step of the M benchmark config) and writes the two halves'
    gradients into one tensor (the chunk's backward would concatenate them)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        x, gate = h.chunk(2, dim=-1)
        return F.gelu(gate).mul_(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors  # type: ignore[attr-defined]
        x, gate = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_x, grad_gate = grad_h.chunk(2, dim=-1)
        activated = F.gelu(gate)
        torch.mul(grad, activated, out=grad_x)
        torch.mul(grad, x, out=activated)
        torch.ops.aten.gelu_backward.grad_input(activated, gate, grad_input=grad_gate)
        return grad_h


class GEGLU(nn.Module):
    """:func:`geglu` as a module (the feed-forward's ``net[1]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return geglu(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float, activation: str = "gelu") -> None:
        super().__init__()
        gated = activation == "geglu"
        self.net = nn.Sequential(
            Linear(dim, dim * mult * (2 if gated else 1)),
            GEGLU() if gated else nn.GELU(),
            nn.Dropout(dropout),
            Linear(dim * mult, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear]:
        first, _, _, last = tuple(self.net)
        return cast(nn.Linear, first), cast(nn.Linear, last)

    def one_position(self, x: torch.Tensor, layouts: dict[str, torch.Tensor]) -> torch.Tensor:
        """``forward`` in eval mode for one position per row (``x``: ``[B, 1, dim]``): no Sequential, Linear or Dropout
        calls, and the few-row projections of :func:`linear` (with the weight copies in ``layouts``, a KV cache's
        ``projections`` of this layer)."""
        first, activation, _, last = cast(tuple[nn.Linear, nn.Module, nn.Module, nn.Linear], tuple(self.net))
        hidden = activation(linear(x.reshape(x.shape[0], -1), first.weight, first.bias, layouts.get("ff.in")))
        return linear(hidden, last.weight, last.bias, layouts.get("ff.out")).reshape(x.shape)


def few_row_layouts(
    layers: Sequence[tuple[Attention | None, FeedForward | None]], rows: int, *, packed: bool = True
) -> list[dict[str, torch.Tensor]]:
    """For each layer's (attention, feed-forward) modules, the :func:`dalle_transformer.linear.few_row_copy` of the
    projections that decoding steps of ``rows`` rows run faster with (``packed``: as there), by name (a KV cache's
    ``projections``); none off the CPU. A weight shared between layers is copied once."""
    copies: dict[int, torch.Tensor | None] = {}
    layouts = []
    for attn, ff in layers:
        assert attn is not None and ff is not None  # the modules a layer runs, its own or its owner's
        ff_in, ff_out = ff.projections
        weights = {
            "attn.qkv": attn.to_qkv.weight,
            "attn.out": attn.to_out.weight,
            "ff.in": ff_in.weight,
            "ff.out": ff_out.weight,
        }
        layout = {}
        for name, weight in weights.items():
            if id(weight) not in copies:
                copies[id(weight)] = few_row_copy(weight, rows, packed=packed)
            copy = copies[id(weight)]
            if copy is not None:
                layout[name] = copy
        layouts.append(layout)
    return layouts


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
        return h * self.attn_scale if self.layer_scale else h

    def feed_forward_branch(self, x: torch.Tensor, ff: FeedForward, context: PassContext) -> torch.Tensor:
        h = self._shift(self.ff_norm(x), context, 1)
        if context.single:
            assert context.cache is not None  # PassContext.single implies a cache
            h = ff.one_position(h, context.cache.projections[self.index])
        else:
            h = ff(h)
        if self.sandwich_norm:
            h = self.ff_out_norm(h)
        return h * self.ff_scale if self.layer_scale else h


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
