"""Checks on everything a caller passes in, done before any embedding lookup, with one-line errors naming the limit."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from dalle_core.errors import ConfigError, ShapeError, VocabularyError
from dalle_transformer.config import DALLEConfig


def is_integer_tensor(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__


# Run eagerly under torch.compile (`loop.compile`): reading the result on the host would otherwise break the graph
# with a warning at every compile; skipped, it splits the graph only where the checks are, before the model's work.
@torch.compiler.disable
def check_range(ids: torch.Tensor, size: int, kind: str, field: str) -> None:
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        value = int(ids[bad][0])
        raise VocabularyError(f"{kind} ids must be in [0, {field}={size}), got {value}")


def check_text_ids(config: DALLEConfig, text_ids: torch.Tensor, what: str = "text ids") -> None:
    """``int[B, <= text_seq_len]`` with ids in ``[0, num_text_tokens)``."""
    if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or not is_integer_tensor(text_ids):
        raise ShapeError(
            f"expected {what} as an integer tensor [batch, <= {config.text_seq_len}], got {describe(text_ids)}"
        )
    if text_ids.shape[1] > config.text_seq_len:
        raise ShapeError(
            f"text is too long: expected at most text_seq_len={config.text_seq_len} ids, got {text_ids.shape[1]}"
        )
    check_range(text_ids, config.num_text_tokens, "text", "num_text_tokens")


def check_image_ids(config: DALLEConfig, image_ids: torch.Tensor, batch_size: int | None = None) -> None:
    """``int[B, image_seq_len]`` with ids in ``[0, num_image_tokens)``."""
    expected = f"[{batch_size if batch_size is not None else 'batch'}, {config.image_seq_len}]"
    if not isinstance(image_ids, torch.Tensor) or image_ids.dim() != 2 or not is_integer_tensor(image_ids):
        raise ShapeError(f"expected image ids as an integer tensor {expected}, got {describe(image_ids)}")
    if image_ids.shape[1] != config.image_seq_len or batch_size not in (None, image_ids.shape[0]):
        raise ShapeError(
            f"expected image ids of shape {expected} (image_seq_len = image_fmap_size**2 = "
            f"{config.image_seq_len}), got {list(image_ids.shape)}"
        )
    check_range(image_ids, config.num_image_tokens, "image", "num_image_tokens")


def check_image_prefix(config: DALLEConfig, image_ids: torch.Tensor, batch_size: int, what: str) -> None:
    """``int[batch_size, k]`` with ``k <= image_seq_len`` and ids in ``[0, num_image_tokens)``."""
    n = config.image_seq_len
    if not isinstance(image_ids, torch.Tensor) or image_ids.dim() != 2 or not is_integer_tensor(image_ids):
        raise ShapeError(f"expected {what} as an integer tensor [{batch_size}, <= {n}], got {describe(image_ids)}")
    if image_ids.shape[0] != batch_size or image_ids.shape[1] > n:
        raise ShapeError(
            f"expected {what} of shape [{batch_size}, <= image_seq_len={n}] (one row per text), "
            f"got {list(image_ids.shape)}"
        )
    check_range(image_ids, config.num_image_tokens, "image", "num_image_tokens")


def resolve_num_init_tokens(config: DALLEConfig, init_image_ids: torch.Tensor, num_init_img_tokens: int | None) -> int:
    """How many leading image tokens priming keeps: ``num_init_img_tokens``, else all of a partial prefix, else
    (a whole image) DALLE-pytorch's default ``int(0.4375 * image_seq_len)`` (OpenAI's 14 of 32 rows)."""
    n, given = config.image_seq_len, init_image_ids.shape[1]
    if num_init_img_tokens is None:
        return int(0.4375 * n) if given == n else given
    if isinstance(num_init_img_tokens, bool) or not isinstance(num_init_img_tokens, int):
        raise ConfigError(f"num_init_img_tokens: expected an integer, got {num_init_img_tokens!r}")
    limit = min(given, n - 1)
    if not 0 <= num_init_img_tokens <= limit:
        raise ConfigError(
            f"num_init_img_tokens: expected an integer in [0, {limit}] (at most the {given} given image ids and less "
            f"than image_seq_len={n}), got {num_init_img_tokens}"
        )
    return num_init_img_tokens


def check_cond_scale(cond_scale: float) -> None:
    if isinstance(cond_scale, bool) or not isinstance(cond_scale, (int, float)) or not math.isfinite(cond_scale):
        raise ConfigError(f"cond_scale: expected a finite number >= 0, got {cond_scale!r}")
    if cond_scale < 0:
        raise ConfigError(f"cond_scale: expected a finite number >= 0 (1: no guidance), got {cond_scale!r}")


def check_callback(callback: Callable[[int, torch.Tensor], object] | None, every: int) -> None:
    if callback is not None and not callable(callback):
        raise ConfigError(f"callback: expected None or a function (step, ids), got {type(callback).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"callback_every: expected a positive integer, got {every!r}")
