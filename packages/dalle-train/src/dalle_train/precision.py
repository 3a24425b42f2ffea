"""Mixed precision: autocast for the forward pass and a gradient scaler where the format needs one.

``bf16`` has float32's exponent range, so it needs no loss scaling and runs on CPU and recent GPUs. ``fp16`` overflows
without scaling, so it comes with a ``GradScaler``; PyTorch supports it on CUDA only, so elsewhere it is refused
before any work starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dalle_core.errors import ConfigError
from dalle_train.config import Precision

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: Precision, device: torch.device, field: str = "loop.precision") -> None:
    """Raise if ``precision`` cannot run on ``device``."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"{field}=fp16 needs a CUDA device (PyTorch has no fp16 autocast with loss scaling on "
            f"{device.type}); use bf16 or fp32 there"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{field}=bf16: this GPU does not support bfloat16; use fp16 or fp32")


@contextlib.contextmanager
def autocast(precision: Precision, device: torch.device) -> Iterator[None]:
    """Autocast to the precision's dtype on ``device`` (nothing for fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def make_grad_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16, ``None`` otherwise."""
    if precision != "fp16":
        return None
    check_precision(precision, device)
    return torch.amp.GradScaler(device.type)
