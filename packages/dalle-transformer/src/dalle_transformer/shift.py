"""Token shifting as in DALLE-pytorch 1.6.6 (``shift_tokens=True``), applied to each branch's normalised input.

Text part (BOS and text): the first ``ceil(dim / 2)`` features come from the previous position (zeros at BOS).
Image tokens: the first ``c = ceil(dim / 4)`` features come from the token above, the next ``c`` from the token to the
left (zeros past the grid's top or left edge); the rest stay.

One table of *source positions* per channel segment defines it; the training path gathers from the padded
sequence and the cached path from the stored history, so both read the same sources.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from dalle_transformer.config import DALLEConfig


class TokenShift:
    """Source positions of the shifted channels: ``segments`` of ``(first_channel, end_channel, source[L])``.

    ``source[p] = -1`` reads zeros; ``width`` channels take part (the rest are never shifted).
    """

    def __init__(self, config: DALLEConfig) -> None:
        dim, text_len, f = config.dim, config.text_seq_len + 1, config.image_fmap_size
        length = config.total_seq_len
        half, quarter = math.ceil(dim / 2), math.ceil(dim / 4)
        self.width = max(half, 2 * quarter)
        positions = torch.arange(length)
        cell = positions - text_len
        is_text = positions < text_len
        previous = positions - 1  # BOS (position 0) reads zeros
        above = torch.where(cell >= f, positions - f, -1)
        left = torch.where(cell % f != 0, positions - 1, -1)
        bounds = sorted({0, quarter, 2 * quarter, half, self.width})
        self._on_device: dict[torch.device, list[torch.Tensor]] = {}
        self.segments: list[tuple[int, int, torch.Tensor]] = []
        for start, end in itertools.pairwise(bounds):
            text_source = previous if start < half else positions
            if end <= quarter:
                image_source = above
            elif end <= 2 * quarter:
                image_source = left
            else:
                image_source = positions
            self.segments.append((start, end, torch.where(is_text, text_source, image_source)))

    def shift(self, history: torch.Tensor, x: torch.Tensor, start: int) -> torch.Tensor:
        """Shifted ``x`` (``[B, n, dim]``, positions ``start..start+n``); ``history`` is ``[B, start + n + 1, width]``:
        a zero row, then the first ``width`` channels of every position so far (``x``'s included)."""
        n = x.shape[1]
        parts = []
        for (first, end, _), index in zip(self.segments, self._indices(history.device), strict=True):
            parts.append(history[:, index[start : start + n], first:end])
        return torch.cat([*parts, x[..., self.width :]], dim=-1)

    def shift_at(self, history: torch.Tensor, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """:meth:`shift` for one position (``x``: ``[B, 1, dim]``) given as ``int64[1]``, over a whole history."""
        parts = []
        for (first, end, _), index in zip(self.segments, self._indices(history.device), strict=True):
            parts.append(history[..., first:end].index_select(1, index.index_select(0, position)))
        return torch.cat([*parts, x[..., self.width :]], dim=-1)

    def _indices(self, device: torch.device) -> list[torch.Tensor]:
        """The sources as row indices into a history (``+ 1``: its zero row), kept on each device used."""
        if device not in self._on_device:
            with torch.inference_mode(False):  # also used by training after a first use while generating
                self._on_device[device] = [(source + 1).to(device) for _, _, source in self.segments]
        return self._on_device[device]

    def shift_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Shift a whole sequence starting at position 0 (training, prefill without history)."""
        return self.shift(F.pad(x[..., : self.width], (0, 0, 1, 0)), x, 0)
