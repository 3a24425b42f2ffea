"""Reversible layers (RevNet coupling, as DALLE-pytorch's ``reversible=True``), with real memory savings.

The input is duplicated into two streams; layer ``i`` with attention branch ``f`` and feed-forward branch ``g`` maps
``(x1, x2)`` to ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``; the output is the mean of the two streams. The coupling is
invertible (``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``), so training keeps only the last layer's streams: backward
walks the layers in reverse, rebuilding each layer's inputs and recomputing its branches to get the gradients.
Dropout inside a branch replays the random numbers of the forward pass (the RNG state is saved per branch call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Branch = Callable[[torch.Tensor], torch.Tensor]


class _RngState:
    """CPU (and, when in use, the current CUDA device's) RNG state at one branch call, to replay its dropout."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def replay(self, fn: Branch, x: torch.Tensor) -> torch.Tensor:
        devices = [self.device] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            return fn(x)


class _ReversibleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x1: torch.Tensor, x2: torch.Tensor, branches: Sequence[tuple[Branch, Branch]], *params):
        states = []
        with torch.no_grad():
            for f, g in branches:
                f_state = _RngState(x1.device)
                x1 = x1 + f(x2)
                g_state = _RngState(x1.device)
                x2 = x2 + g(x1)
                states.append((f_state, g_state))
        ctx.branches, ctx.states, ctx.params = branches, states, params
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: torch.Tensor, dy2: torch.Tensor):
        y1, y2 = ctx.saved_tensors
        params = ctx.params
        grads: list[torch.Tensor | None] = [None] * len(params)

        def accumulate(new: Sequence[torch.Tensor | None]) -> None:
            for i, grad in enumerate(new):
                if grad is not None:
                    before = grads[i]
                    grads[i] = grad if before is None else before + grad

        for (f, g), (f_state, g_state) in zip(reversed(ctx.branches), reversed(ctx.states), strict=True):
            # y2 = x2 + g(y1): recompute g(y1) with grad, push dy2 through it.
            with torch.enable_grad():
                y1 = y1.detach().requires_grad_(True)
                gy1 = g_state.replay(g, y1)
                d_y1, *d_params = torch.autograd.grad(gy1, (y1, *params), dy2, allow_unused=True)
            accumulate(d_params)
            with torch.no_grad():
                x2 = y2 - gy1
                dx1 = dy1 + d_y1
            # y1 = x1 + f(x2): recompute f(x2) with grad, push dx1 through it.
            with torch.enable_grad():
                x2 = x2.detach().requires_grad_(True)
                fx2 = f_state.replay(f, x2)
                d_x2, *d_params = torch.autograd.grad(fx2, (x2, *params), dx1, allow_unused=True)
            accumulate(d_params)
            with torch.no_grad():
                x1 = y1 - fx2
                dx2 = dy2 + d_x2
            y1, y2, dy1, dy2 = x1.detach(), x2.detach(), dx1, dx2
        return (dy1, dy2, None, *grads)


def run_reversible(
    branches: Sequence[tuple[Branch, Branch]], x: torch.Tensor, params: Sequence[torch.nn.Parameter]
) -> torch.Tensor:
    """The reversible stack on ``x``: memory-saving autograd when gradients are needed, a plain loop otherwise."""
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        trainable = tuple(p for p in params if p.requires_grad)
        y1, y2 = _ReversibleFunction.apply(x, x, list(branches), *trainable)
    else:
        y1, y2 = x, x
        for f, g in branches:
            y1 = y1 + f(y2)
            y2 = y2 + g(y1)
    return (y1 + y2) / 2
