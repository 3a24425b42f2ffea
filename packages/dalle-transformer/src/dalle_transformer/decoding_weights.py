"""The tensors a layer's decoding steps read, looked up once per sequence.

A decoding step runs every layer on one position per row: a few small products and elementwise operations, next to
which a small model's step spends about as long in Python, in module calls and in parameter lookups through
``nn.Module.__getattr__``. When a sequence starts (a pass over an empty KV cache), the model gathers each layer's
norms, projections and scales here, with the projections' few-row copies (:func:`dalle_transformer.linear.
few_row_copy`), into its cache's ``layer_weights``; the steps read them as tuple fields. With the image logits'
projection copied too (the cache's ``image_head``) and fewer operations in each layer and in the sampler, the small
benchmark model of docs/benchmarks.md generates 13% faster on its 2-core CPU, the medium one 5-8%.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dalle_transformer.linear import StreamedWeight, few_row_copy, linear


class Projection(NamedTuple):
    """A linear layer's tensors: ``prepared`` is the weight's few-row copy, or None to read the weight as stored."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    prepared: torch.Tensor | StreamedWeight | None


class Norm(NamedTuple):
    """A ``nn.LayerNorm``'s arguments to ``torch.layer_norm``."""

    shape: tuple[int, ...]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


class DecodingWeights(NamedTuple):
    """One layer's tensors for its decoding steps: its own norms and scales (None where the config has none), and the
    projections of the attention and feed-forward modules it runs (its own or an earlier layer's, when shared)."""

    attn_norm: Norm
    qkv: Projection
    out: Projection
    attn_out_norm: Norm | None
    attn_scale: torch.Tensor | None
    ff_norm: Norm
    ff_in: Projection
    ff_out: Projection
    ff_out_norm: Norm | None
    ff_scale: torch.Tensor | None


def project(projection: Projection, x: torch.Tensor) -> torch.Tensor:
    return linear(x, projection.weight, projection.bias, projection.prepared)


def normalize(norm: Norm, x: torch.Tensor) -> torch.Tensor:
    # torch.layer_norm itself: F.layer_norm's checks cost as much as the norm of a few rows.
    return torch.layer_norm(x, norm.shape, norm.weight, norm.bias, norm.eps)


def norm_of(module: nn.LayerNorm) -> Norm:
    return Norm(tuple(module.normalized_shape), module.weight, module.bias, module.eps)


class ProjectionCopies:
    """Makes :class:`Projection` s with few-row copies of their weights, for products of ``rows`` rows (``packed``:
    as :func:`few_row_copy` takes it; ``copies`` off: none); a weight shared between layers is copied once."""

    def __init__(self, rows: int, *, packed: bool, copies: bool) -> None:
        self.rows, self.packed, self.copies = rows, packed, copies
        # By id: each weight and its copy.
        self._made: dict[int, tuple[torch.Tensor, torch.Tensor | StreamedWeight | None]] = {}

    def __call__(self, layer: nn.Linear) -> Projection:
        return self.of(layer.weight, layer.bias)

    def of(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Projection:
        if not self.copies:
            return Projection(weight, bias, None)
        if id(weight) not in self._made:  # the weight is kept with its copy: its id stays its own
            self._made[id(weight)] = (weight, few_row_copy(weight, self.rows, packed=self.packed))
        return Projection(weight, bias, self._made[id(weight)][1])
