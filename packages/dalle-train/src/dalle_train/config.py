"""Training configs: frozen dataclasses loaded from YAML/JSON with ``--set a.b=value`` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dalle_core.config import from_dict
from dalle_core.errors import ConfigError
from dalle_transformer import DALLEConfig
from dalle_vae import DiscreteVAEConfig


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass(frozen=True)
class LoopConfig:
    """What every training loop shares: length, batch, cadence of samples and checkpoints, seed."""

    steps: int = 1000
    batch_size: int = 32
    sample_every: int = 250
    checkpoint_every: int = 250
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "sample_every", "checkpoint_every", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"loop.{name} must be >= 1, got {getattr(self, name)}")


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
    vocabulary sizes and grid size are filled in from the tokenizers, so they cannot disagree.
    """

    model: dict[str, Any] = field(default_factory=dict)
    text_seq_len: int = 48
    loop: LoopConfig = field(default_factory=LoopConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sample_temperature: float = 1.0
    sample_top_k: int | None = None

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
        from_dict(DALLEConfig, {**self.model, **placeholders, "text_seq_len": self.text_seq_len}, prefix="model")
