"""Training the DALLE transformer: its step function (:class:`DALLETask`) for the shared loop, and
:func:`train_dalle` on pre-tokenized data."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.config import from_dict, to_dict
from dalle_core.images import save_image_grid
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_train.backends.base import Backend
from dalle_train.bundle import check_compatible, write_bundle
from dalle_train.config import DALLETrainConfig
from dalle_train.datasets.samples import SkipUnreadable
from dalle_train.datasets.streams import MapBatchStream, evaluation_batches
from dalle_train.loop import train_loop
from dalle_train.run_config import LoggingConfig
from dalle_train.run_logger import RunLogger
from dalle_train.task import StepContext
from dalle_train.tokenized import TokenData, TokenDataset
from dalle_train.vae_trainer import micro_batch_size
from dalle_transformer import DALLE, DALLEConfig

Batch = dict[str, Any]


def build_model_config(
    config: DALLETrainConfig, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer
) -> DALLEConfig:
    """The transformer's config: architecture from ``config.model``, vocabularies and grid from the tokenizers."""
    fields = {
        **config.model,
        "num_text_tokens": text_tokenizer.vocab_size,
        "text_pad_id": text_tokenizer.pad_id,
        "text_seq_len": config.text_seq_len,
        "num_image_tokens": image_tokenizer.num_tokens,
        "image_fmap_size": image_tokenizer.fmap_size,
    }
    return from_dict(DALLEConfig, fields, prefix="model")


@torch.no_grad()
def validation_loss(model: DALLE, data: TokenData, batch_size: int = 64) -> dict[str, float]:
    """Mean text, image and combined loss over ``data`` (weighted by batch size), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    for start in range(0, len(data), batch_size):
        stop = min(len(data), start + batch_size)
        out = model.loss(data.text_ids[start:stop].to(device), data.image_ids[start:stop].to(device))
        for key in totals:
            totals[key] += float(getattr(out, key)) * (stop - start)
    model.train(was_training)
    return {f"val_{key}": value / len(data) for key, value in totals.items()}


@torch.no_grad()
def sample_grid(
    model: DALLE,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    prompts: Sequence[str],
    path: Path,
    temperature: float,
    top_k: int | None,
    seed: int = 0,
) -> None:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    text_ids = text_tokenizer.encode(list(prompts), model.config.text_seq_len, truncate=True).to(device)
    generator = torch.Generator(device).manual_seed(seed)
    ids = model.generate_image_ids(text_ids, temperature=temperature, top_k=top_k, generator=generator)
    save_image_grid(image_tokenizer.decode(ids).cpu(), path, scale=4)
    model.train(was_training)


class DALLETask:
    """Cross-entropy over text and image tokens. Batches bring ``text_ids`` and either ``image_ids`` (pre-tokenized)
    or ``images``, which the frozen image tokenizer encodes on the training device."""

    name = "dalle"

    def __init__(
        self,
        config: DALLETrainConfig,
        text_tokenizer: TextTokenizer,
        image_tokenizer: ImageTokenizer,
        prompts: Sequence[str],
        device: torch.device,
        training_config: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.model_config = build_model_config(config, text_tokenizer, image_tokenizer)
        self.text_tokenizer = text_tokenizer
        if isinstance(image_tokenizer, nn.Module):
            # A frozen copy on the training device: the caller's tokenizer stays where and as it was.
            image_tokenizer = copy.deepcopy(image_tokenizer).to(device).eval().requires_grad_(False)
        self.image_tokenizer = image_tokenizer
        self.prompts = list(prompts)
        self.training_config = training_config if training_config is not None else to_dict(config)

    def build_model(self) -> nn.Module:
        model = DALLE(self.model_config)
        check_compatible(model, self.text_tokenizer, self.image_tokenizer)
        return model

    def loss(
        self, model: nn.Module, batch: Batch, context: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        text_ids = batch["text_ids"].to(context.device, non_blocking=True)
        if "image_ids" in batch:
            image_ids = batch["image_ids"].to(context.device, non_blocking=True)
        else:
            with torch.no_grad():  # outside autocast: token ids must not depend on the training precision
                image_ids = self.image_tokenizer.encode(batch["images"].to(context.device, non_blocking=True))
        with context.autocast():
            out = model(text_ids, image_ids)  # forward returns the losses (and goes through DDP/FSDP hooks)
        metrics = {"loss": out.loss, "text_loss": out.text_loss, "image_loss": out.image_loss}
        return out.loss, {name: value.detach() for name, value in metrics.items()}

    def tokens(self, batch: Batch) -> int:
        return int(batch["text_ids"].shape[0]) * self.model_config.total_seq_len

    def scalars(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def signature(self) -> dict[str, Any]:
        return to_dict(self.model_config)

    def write_export(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        model = DALLE(self.model_config)
        model.load_state_dict(state)
        write_bundle(directory, model, self.text_tokenizer, self.image_tokenizer, self.training_config)

    def read_export(self, directory: Path) -> nn.Module:
        return DALLE.load(directory).eval()

    def sample(self, model: nn.Module, path: Path, device: torch.device) -> dict[str, float]:
        if not self.prompts:
            return {}
        sample_grid(
            model,  # type: ignore[arg-type,unused-ignore]
            self.text_tokenizer,
            self.image_tokenizer,
            self.prompts,
            path,
            self.config.sample_temperature,
            self.config.sample_top_k,
        )
        return {}


def train_dalle(
    config: DALLETrainConfig,
    data: TokenData,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    run_dir: Path,
    sample_prompts: Sequence[str] = (),
    validation: TokenData | None = None,
    resume: bool = True,
    *,
    backend: Backend | None = None,
    logging: LoggingConfig | None = None,
) -> DALLE:
    """Train the transformer on pre-tokenized ``data``; returns it in eval mode on CPU.

    Every ``sample_every`` steps: a grid for ``sample_prompts`` (or ``config.sample_prompts``) in ``run_dir/samples/``
    and the validation loss. Checkpoints hold generation bundles, so any of them works with ``dalle generate``.
    """
    from dalle_train.backends import SingleBackend

    backend = backend or SingleBackend()
    loop = config.loop
    micro = micro_batch_size(loop.batch_size, backend.world_size, loop.grad_accum_steps, "dalle.loop")
    stream = MapBatchStream(SkipUnreadable(TokenDataset(data)), micro, backend.rank, backend.world_size, loop.seed)
    prompts = list(sample_prompts) or list(config.sample_prompts)
    task = DALLETask(config, text_tokenizer, image_tokenizer, prompts, backend.device)
    validate = None
    if validation is not None:
        held_out = SkipUnreadable(TokenDataset(validation))

        def validate() -> Any:
            return evaluation_batches(held_out, micro, backend.rank, backend.world_size, loop.validation_batches)

    logger = RunLogger(run_dir, logging, enabled=backend.is_main)
    model = train_loop(task, stream, loop, config.optimizer, backend, logger, run_dir, validate, resume=resume)
    return model  # type: ignore[return-value,unused-ignore]
