"""Per-stage training configs: frozen dataclasses loaded from YAML/JSON with ``--set a.b=value`` overrides.

A stage (VAE or transformer) has a ``loop`` (length, batch, cadence, precision, accumulation, EMA, checkpoints) and an
``optimizer`` (AdamW and its learning-rate schedule). The whole run, with data, tokenizer, backend and logging, is
:class:`dalle_train.run_config.RunConfig`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from dalle_core.config import from_dict
from dalle_core.errors import ConfigError
from dalle_transformer import DALLEConfig
from dalle_vae import DiscreteVAEConfig

Precision = Literal["fp32", "bf16", "fp16"]
Schedule = Literal["cosine", "constant", "plateau"]


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (no weight decay on norms, biases and embeddings) and its learning-rate schedule.

    ``schedule``: ``cosine`` decays from ``lr`` to ``lr * min_lr_ratio`` at the last step; ``constant`` stays at
    ``lr``; ``plateau`` multiplies the rate by ``plateau_factor`` whenever the evaluated loss (validation loss, or the
    mean training loss since the last evaluation when there is no validation data) has not improved by
    ``plateau_threshold`` (relative) for ``plateau_patience`` evaluations, down to ``lr * min_lr_ratio``. All three
    start with ``warmup_steps`` of linear warmup. ``grad_clip`` is the global gradient-norm limit (0: no clipping).
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    schedule: Schedule = "cosine"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    plateau_threshold: float = 1e-3

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError(f"optimizer.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"optimizer.betas must both be in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps must be positive, got {self.eps}")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"optimizer.plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.plateau_patience < 1:
            raise ConfigError(f"optimizer.plateau_patience must be >= 1, got {self.plateau_patience}")
        if self.plateau_threshold < 0:
            raise ConfigError(f"optimizer.plateau_threshold must be >= 0, got {self.plateau_threshold}")


@dataclass(frozen=True)
class LoopConfig:
    """What every training loop shares.

    ``batch_size`` is the global batch of one optimizer step: it is split over ``world_size`` processes and
    ``grad_accum_steps`` micro-batches, so it must be divisible by their product. Every ``sample_every`` steps the
    loop measures the validation loss (at most ``validation_batches`` micro-batches per process) and writes a sample
    grid; every ``checkpoint_every`` steps it writes a checkpoint and keeps the newest ``keep_last``.
    ``ema_decay`` > 0 keeps an exponential moving average of the weights, used for samples and exported models.
    ``compile`` runs the model's forward (and so its backward) through ``torch.compile`` (``nn.Module.compile``: the
    weights, their names and the checkpoints stay those of the plain model); it pays off on GPUs, costs a compile
    of tens of seconds at the start and after each switch between training and validation, and needs a C++
    compiler on CPUs, where the compiled steps call the same C kernels as eager ones and run about as fast.
    A step whose loss or gradients are not finite is skipped (and reported); ``max_nonfinite_steps`` such steps in a
    row stop the run.
    """

    steps: int = 1000
    batch_size: int = 32
    grad_accum_steps: int = 1
    precision: Precision = "fp32"
    compile: bool = False
    ema_decay: float = 0.0
    sample_every: int = 250
    validation_batches: int = 16
    checkpoint_every: int = 250
    keep_last: int = 2
    log_every: int = 10
    max_nonfinite_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "grad_accum_steps",
            "sample_every",
            "validation_batches",
            "checkpoint_every",
            "keep_last",
            "log_every",
            "max_nonfinite_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema_decay < 1 or math.isnan(self.ema_decay):
            raise ConfigError(f"loop.ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"loop.batch_size={self.batch_size} must be divisible by loop.grad_accum_steps={self.grad_accum_steps}"
            )


@dataclass(frozen=True)
class VAETrainConfig:
    """Training a DiscreteVAE: Gumbel temperature annealed exponentially from ``temperature_start`` to ``_end``."""

    vae: DiscreteVAEConfig = field(default_factory=DiscreteVAEConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-3))
    temperature_start: float = 1.0
    temperature_end: float = 1.0 / 16

    def __post_init__(self) -> None:
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ConfigError(
                f"temperature_end must be in (0, temperature_start={self.temperature_start}], "
                f"got {self.temperature_end}"
            )


@dataclass(frozen=True)
class DALLETrainConfig:
    """Training the transformer on (text ids, image ids).

    ``model`` holds the architecture options of ``dalle_transformer.DALLEConfig`` (dim, depth, heads, ...); the
    vocabulary sizes and grid size are filled in from the tokenizers, so they cannot disagree. ``sample_prompts`` are
    drawn every ``loop.sample_every`` steps (none: the first captions of the validation or training data).
    """

    model: dict[str, Any] = field(default_factory=dict)
    text_seq_len: int = 48
    loop: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sample_temperature: float = 1.0
    sample_top_k: int | None = None
    sample_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.text_seq_len < 1:
            raise ConfigError(f"text_seq_len must be >= 1, got {self.text_seq_len}")
        for reserved in ("num_text_tokens", "num_image_tokens", "image_fmap_size", "text_seq_len", "text_pad_id"):
            if reserved in self.model:
                raise ConfigError(
                    f"model.{reserved} comes from the tokenizers and the top-level text_seq_len; remove it from model"
                )
        # Check the architecture now, before any data is made or any model trained; the placeholder vocabulary
        # sizes are replaced by the tokenizers' real ones when the model is built.
        placeholders = {"num_text_tokens": 2, "num_image_tokens": 2, "image_fmap_size": 1, "text_pad_id": 0}
        with model_field_names():
            from_dict(DALLEConfig, {**self.model, **placeholders, "text_seq_len": self.text_seq_len}, prefix="model")


@contextlib.contextmanager
def model_field_names(prefix: str = "model.") -> Iterator[None]:
    """Re-raise the transformer's ``DALLEConfig.x`` errors as ``model.x``, the field a user writes in a config."""
    try:
        yield
    except ConfigError as error:
        raise ConfigError(str(error).replace("DALLEConfig.", prefix)) from None
