"""KV-cached decoding steps replayed from one captured CUDA graph.

On a GPU, one decoding step of a model of DALL-E's sizes is a few hundred kernels of a few microseconds each, and
launching them from Python takes longer than running them. :class:`GraphedDecoder` captures the step once (as
:meth:`DALLE._decode_step_at`, whose every index is a device tensor) and replays it for each later token, after
copying in the new ids and position. It computes what the eager step computes, except that attention reads the whole
cache under a mask row instead of gathering the allowed keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dalle_transformer.cache import KVCache

if TYPE_CHECKING:
    from dalle_transformer.model import DALLE


class GraphedDecoder:
    """Decode steps of ``model`` over ``cache`` (already prefilled), captured at the first call."""

    def __init__(self, model: DALLE, cache: KVCache, compile_step: bool = False) -> None:
        self.model = model
        self.cache = cache
        # With compile_step the captured step is torch.compile's (fused elementwise work: fewer, larger kernels).
        self._step = torch.compile(model._decode_step_at, dynamic=False) if compile_step else model._decode_step_at
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.keys.device)
        self._position = torch.zeros(1, dtype=torch.long, device=cache.keys.device)
        self._logits = torch.empty(0)

    def __call__(self, image_ids: torch.Tensor, image_position: int) -> torch.Tensor:
        """Logits ``[B, num_image_tokens]`` of image token ``image_position + 1`` after feeding ``image_ids``
        (``int64[B]``) at ``image_position``; the cache must hold every earlier position, as for ``decode_step``."""
        self._ids.copy_(image_ids)
        self._position.fill_(image_position)
        length = self.cache.length
        if self._graph is None:
            self._graph = self._capture()
        self._graph.replay()
        self.cache.length = length + 1
        return self._logits.clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self) -> torch.cuda.CUDAGraph:
        # A warm-up run on a side stream first (as torch.cuda.graphs asks): it builds the lazily made mask and
        # index tables and the library handles, which capture cannot. It writes the position the replay rewrites.
        device, length = self._ids.device, self.cache.length
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._step(self._ids, self._position, self.cache)
        torch.cuda.current_stream(device).wait_stream(side)
        self.cache.length = length
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._step(self._ids, self._position, self.cache)
        self.cache.length = length
        return graph
