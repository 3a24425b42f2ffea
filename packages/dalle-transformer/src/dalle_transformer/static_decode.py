"""KV-cached decoding steps with static shapes: compiled once by ``torch.compile``, replayed from a CUDA graph.

Eager decoding runs a few hundred small operations per token, and dispatching them from Python costs about as much
as the work itself (on a GPU much more). :class:`StaticDecoder` runs :meth:`DALLE._decode_step_at`, the decoding
step whose position is a device tensor and whose every buffer has the same shape at every position, so that

- ``compile_step``: ``torch.compile`` builds it once for a whole generation (inductor fuses the elementwise work;
  on the CPU the projections become vectorised loops that read each weight once, :mod:`dalle_transformer.linear`);
- ``cuda_graph``: on CUDA it is captured at the first step and replayed for each later token, after copying in
  the new ids and position.

Both compute what the eager step computes, up to float rounding. On CUDA the attention reads the whole cache under
the position's mask row (a captured graph cannot index on the host); elsewhere it gathers the allowed keys, as the
eager step does (:func:`dalle_transformer.kernels.attend_decode_at`).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from dalle_core.errors import ShapeError
from dalle_transformer.cache import KVCache

if TYPE_CHECKING:
    from dalle_transformer.model import DALLE

StepFunction = Callable[["DALLE", torch.Tensor, torch.Tensor, KVCache], torch.Tensor]


@functools.cache
def compiled_decode_step() -> StepFunction:
    """One compiled function for every model and generation (torch.compile keeps its builds per wrapper, so a
    wrapper made per generation would compile again each time); dynamic=False: one build per batch size."""
    from dalle_transformer.model import DALLE

    return torch.compile(DALLE._decode_step_at, dynamic=False)


class StaticDecoder:
    """Decoding steps of ``model`` over ``cache`` (already prefilled): ``compile_step`` runs the ``torch.compile``
    build of the step, ``cuda_graph`` (CUDA caches only) captures it at the first call and replays it."""

    def __init__(self, model: DALLE, cache: KVCache, *, compile_step: bool = False, cuda_graph: bool = False) -> None:
        if cuda_graph and cache.device.type != "cuda":
            raise ValueError(f"CUDA-graph decoding needs a KV cache on a CUDA device, got one on {cache.device}")
        self.model = model
        self.cache = cache
        self.cuda_graph = cuda_graph
        self._compiled = compile_step
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids = torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device)
        self._position = torch.zeros(1, dtype=torch.long, device=cache.device)
        self._logits = torch.empty(0)

    def __call__(self, image_ids: torch.Tensor, image_position: int) -> torch.Tensor:
        """Logits ``[B, num_image_tokens]`` of image token ``image_position + 1`` after feeding ``image_ids``
        (``int64[B]``) at ``image_position``; the cache must hold every earlier position, as for ``decode_step``."""
        written = self.model.config.text_seq_len + 1 + image_position
        if self.cache.length != written or not 0 <= image_position < self.model.config.image_seq_len - 1:
            raise ShapeError(
                f"a decoding step at image position {image_position} needs a KV cache holding {written} positions "
                f"(image positions 0..{self.model.config.image_seq_len - 2}); it holds {self.cache.length}"
            )
        self._ids.copy_(image_ids)
        self._position.fill_(image_position)
        if self.cuda_graph:
            if self._graph is None:
                self._graph = self._capture()
            self._graph.replay()
            logits = self._logits.clone()  # the graph's output buffer is overwritten by the next replay
        else:
            logits = self._run()
        self.cache.length = written + 1
        return logits

    def _run(self) -> torch.Tensor:
        if not self._compiled:
            return self.model._decode_step_at(self._ids, self._position, self.cache)
        try:
            return compiled_decode_step()(self.model, self._ids, self._position, self.cache)
        except (RuntimeError, torch._dynamo.exc.TorchDynamoException) as error:  # no C++ compiler, for one
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            warnings.warn(
                f"compiling the decoding step failed ({type(error).__name__}: {first_line}); decoding eagerly",
                RuntimeWarning,
                stacklevel=4,
            )
            self._compiled = False
            return self.model._decode_step_at(self._ids, self._position, self.cache)

    def _capture(self) -> torch.cuda.CUDAGraph:
        # A warm-up run on a side stream first (as torch.cuda.graphs asks): it compiles the step when asked and
        # builds the lazily made mask and index tables and the library handles, which capture cannot. It writes the
        # position the replay rewrites.
        device = self._ids.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._run()
        torch.cuda.current_stream(device).wait_stream(side)
        step = compiled_decode_step() if self._compiled else type(self.model)._decode_step_at
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = step(self.model, self._ids, self._position, self.cache)
        return graph
