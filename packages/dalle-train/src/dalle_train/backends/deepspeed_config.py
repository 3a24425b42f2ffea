"""The DeepSpeed config a stage runs with: what the run config implies, merged with the user's own JSON file.

dalle-train owns the values its loop also uses: batch sizes, accumulation, clipping, precision, the optimizer and its
schedule. A user file may repeat them but not contradict them (the error names both sides); everything else in it
(ZeRO bucket sizes, communication settings, offload, ...) reaches DeepSpeed as written. Plain data, no DeepSpeed import.

Precision: weights stay fp32 and ``loop.precision=bf16`` becomes DeepSpeed's ``torch_autocast`` (bf16 compute with
fp32 weights, as in the other backends), not its ``bf16`` mode, which would store the weights in bf16 and leave the
EMA and the checkpoints with rounded values. ``fp16`` is refused: DeepSpeed's loss scaling would skip overflowing
steps without the loop's accounting.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from dalle_core.errors import ConfigError
from dalle_train.backends.base import LoopSettings

DEFAULT_ZERO_STAGE = 2
_DTYPE_NAMES = {"bf16": ("bf16", "bfloat16", "torch.bfloat16"), "fp16": ("fp16", "float16", "half", "torch.float16")}


def read_user_config(path: str | None) -> dict[str, Any]:
    """The JSON object in ``backend.deepspeed_config`` (empty without one)."""
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"backend.deepspeed_config: expected a DeepSpeed JSON file, found nothing at {path}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"backend.deepspeed_config: {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"backend.deepspeed_config: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def zero_stage(configured: int | None, user: dict[str, Any], source: str | None) -> int:
    """``backend.deepspeed_zero_stage``, else the file's ``zero_optimization.stage``, else 2."""
    in_file = _lookup(user, ("zero_optimization", "stage"))
    if configured is None:
        stage = DEFAULT_ZERO_STAGE if in_file is _MISSING else in_file
        if stage not in (0, 1, 2, 3):
            raise ConfigError(f"backend.deepspeed_config {source}: zero_optimization.stage must be 0-3, got {stage!r}")
        return int(stage)
    if in_file is not _MISSING and in_file != configured:
        raise _conflict(source, "zero_optimization.stage", in_file, f"backend.deepspeed_zero_stage={configured}")
    return configured


def engine_config(
    settings: LoopSettings, world_size: int, stage: int, user: dict[str, Any], source: str | None
) -> dict[str, Any]:
    """The config for ``deepspeed.initialize``: ``user`` with the values the run implies (raises on a contradiction)."""
    where = settings.stage
    if settings.precision == "fp16":
        raise ConfigError(
            f"{where}.loop.precision=fp16: backend.kind=deepspeed trains in fp32 or bf16 (its fp16 loss scaling would "
            f"skip steps behind the loop's back); use bf16, or backend.kind=ddp/fsdp for fp16"
        )
    if settings.ema and stage == 3:
        raise ConfigError(
            f"{where}.loop.ema_decay > 0 averages whole parameters, but ZeRO stage 3 partitions them; use "
            f"backend.deepspeed_zero_stage 0-2 or backend.kind=fsdp, or set {where}.loop.ema_decay=0"
        )
    for key, owner in (
        ("optimizer", f"{where}.optimizer (AdamW with weight-decay groups, built by dalle-train)"),
        ("scheduler", f"{where}.optimizer.schedule (the loop sets the learning rate every step)"),
    ):
        if key in user:
            raise ConfigError(
                f"backend.deepspeed_config {source}: remove {key!r}; it is set by {owner}, which DeepSpeed uses as is"
            )

    low_precision = settings.precision != "fp32"
    micro = f"{where}.loop.batch_size / (world size {world_size} x {where}.loop.grad_accum_steps)"
    implied: list[tuple[tuple[str, ...], Any, str]] = [
        (("train_batch_size",), settings.batch_size, f"{where}.loop.batch_size={settings.batch_size}"),
        (("train_micro_batch_size_per_gpu",), settings.micro_batch_size, f"{micro} = {settings.micro_batch_size}"),
        (
            ("gradient_accumulation_steps",),
            settings.grad_accum_steps,
            f"{where}.loop.grad_accum_steps={settings.grad_accum_steps}",
        ),
        (("gradient_clipping",), settings.max_grad_norm, f"{where}.optimizer.grad_clip={settings.max_grad_norm}"),
        (("zero_optimization", "stage"), stage, f"backend.deepspeed_zero_stage={stage}"),
        (("torch_autocast", "enabled"), low_precision, f"{where}.loop.precision={settings.precision}"),
        (
            ("bf16", "enabled"),
            False,
            f"{where}.loop.precision={settings.precision} (weights stay fp32; bf16 runs as torch_autocast)",
        ),
        (("fp16", "enabled"), False, f"{where}.loop.precision={settings.precision} (fp16 is not supported here)"),
        (
            ("managed_gradient_accumulation",),
            True,
            "dalle-train's accumulation (it marks the last micro-batch of each step as the boundary)",
        ),
    ]
    if low_precision:
        implied.append((("torch_autocast", "dtype"), "bfloat16", f"{where}.loop.precision={settings.precision}"))

    merged = copy.deepcopy(user)
    for path, value, owner in implied:
        found = _lookup(user, path)
        if found is _MISSING:
            _store(merged, path, value)
        elif not _same(path, found, value):
            raise _conflict(source, ".".join(path), found, owner)
    return merged


# ---------------------------------------------------------------------------------------------------------- helpers

_MISSING = object()


def _lookup(config: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _MISSING
        node = node[key]
    return node


def _store(config: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = config
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def _same(path: tuple[str, ...], found: Any, value: Any) -> bool:
    if path[-1] == "dtype":
        return str(found).lower() in _DTYPE_NAMES["bf16"]
    if isinstance(value, bool):
        return found in (True, False) and bool(found) is value  # true/false (or 1/0) as DeepSpeed reads them
    return isinstance(found, int | float) and float(found) == float(value)


def _conflict(source: str | None, key: str, found: Any, owner: str) -> ConfigError:
    return ConfigError(
        f"backend.deepspeed_config {source}: {key}={json.dumps(found)} contradicts {owner}; remove it from the file "
        f"or change the run config"
    )
