"""Training backends: how processes run and cooperate. See :class:`dalle_train.backends.base.Backend`.

``single`` (one process), ``ddp`` and ``fsdp`` (FSDP2) live in :mod:`.torch_backends` and are launched with
``torchrun``; ``deepspeed`` (:mod:`.deepspeed_backend`) and ``horovod`` (:mod:`.horovod_backend`) import their
libraries only when chosen.
"""

from __future__ import annotations

import os

from dalle_core.errors import ConfigError
from dalle_train.backends.base import Backend, StepResult
from dalle_train.backends.torch_backends import DDPBackend, FSDPBackend, SingleBackend
from dalle_train.run_config import BackendConfig

__all__ = ["Backend", "DDPBackend", "FSDPBackend", "SingleBackend", "StepResult", "make_backend", "resolve_kind"]


def resolve_kind(config: BackendConfig) -> str:
    """``auto`` becomes ``ddp`` under torchrun with more than one process, else ``single``."""
    if config.kind != "auto":
        return config.kind
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def make_backend(config: BackendConfig) -> Backend:
    kind = resolve_kind(config)
    if kind == "single":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                f"backend.kind=single but torchrun started {os.environ['WORLD_SIZE']} processes; use backend.kind=ddp "
                f"or fsdp, or launch one process"
            )
        return SingleBackend(config.device)
    if kind == "ddp":
        return DDPBackend(config.device, config.dist_backend)
    if kind == "fsdp":
        return FSDPBackend(config.device, config.dist_backend, config.fsdp_reshard_after_forward, config.fsdp_units)
    if kind == "deepspeed":
        from dalle_train.backends.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(config)
    if kind == "horovod":
        from dalle_train.backends.horovod_backend import HorovodBackend

        return HorovodBackend(config)
    raise ConfigError(
        f"backend.kind: expected auto, single, ddp, fsdp, deepspeed or horovod, got {kind!r}"
    )  # pragma: no cover
