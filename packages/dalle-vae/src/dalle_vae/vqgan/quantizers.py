"""The two ways a taming VQGAN turns encoder features into codes.

- :class:`VectorQuantizer` (``VQModel``): the nearest codebook vector in Euclidean distance.
- :class:`GumbelQuantizer` (``GumbelVQ``): a 1x1 conv gives logits over the codes. taming's ``GumbelQuantize`` draws
  Gumbel noise even in eval mode, so its codes for an image are random; here the default is the noise-free argmax of
  the logits, and ``sample=True`` draws like taming does (argmax of logits plus Gumbel noise, the hard sample of
  ``F.gumbel_softmax``), from ``generator`` if one is given.

Both map codes back to vectors by a plain embedding lookup. DALLE-pytorch multiplies one-hot codes by the same
matrix, which picks out exactly the same rows, and hands the decoder a permuted view of the result: channels-last in
memory. ``vectors`` returns the same view, so the decoder's convs pick the same kernels and outputs match DALLE-pytorch
bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim, h, w]`` -> ``int64[B, h, w]``: the index of the nearest codebook vector at each position."""
        batch, dim, height, width = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, dim)
        codebook = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, summed in this order as taming does, so near-ties resolve the same way.
        distances = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(codebook**2, dim=1)
            - 2 * torch.matmul(flat, codebook.t())
        )
        return distances.argmin(dim=1).view(batch, height, width)

    def vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """``int64[B, h, w]`` -> ``[B, embed_dim, h, w]``."""
        return self.embedding(codes).permute(0, 3, 1, 2)


class GumbelQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, n_embed, 1)
        self.embed = nn.Embedding(n_embed, embed_dim)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, embed_dim, h, w]`` -> ``[B, n_embed, h, w]``."""
        return self.proj(features)

    def codes(
        self, features: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``int64[B, h, w]``: argmax of the logits, or with ``sample`` of logits plus Gumbel(0, 1) noise."""
        logits = self.logits(features)
        if sample:
            # -log(E), E ~ Exponential(1), drawn as F.gumbel_softmax draws it: same seed, same codes as taming.
            logits = logits - torch.empty_like(logits).exponential_(generator=generator).log()
        return logits.argmax(dim=1)

    def vectors(self, codes: torch.Tensor) -> torch.Tensor:
        """``int64[B, h, w]`` -> ``[B, embed_dim, h, w]``."""
        return self.embed(codes).permute(0, 3, 1, 2)
