"""Training the DiscreteVAE: its step function (:class:`VAETask`) for the shared loop, and :func:`train_vae`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.images import save_image_grid
from dalle_train.backends.base import Backend
from dalle_train.config import VAETrainConfig
from dalle_train.datasets.samples import SkipUnreadable
from dalle_train.datasets.streams import MapBatchStream, evaluation_batches
from dalle_train.loop import train_loop
from dalle_train.run_config import LoggingConfig
from dalle_train.run_logger import RunLogger
from dalle_train.schedules import gumbel_temperature
from dalle_train.task import StepContext
from dalle_vae import DiscreteVAE
from dalle_vae.usage import codebook_usage

Batch = dict[str, Any]


class VAETask:
    """Reconstruction loss of Gumbel-softmax samples; the temperature is annealed with the step."""

    name = "vae"

    def __init__(self, config: VAETrainConfig, sample_images: torch.Tensor) -> None:
        self.config = config
        self.sample_images = sample_images

    def build_model(self) -> nn.Module:
        return DiscreteVAE(self.config.vae)

    def temperature(self, step: int, total_steps: int) -> float:
        return gumbel_temperature(step, total_steps, self.config.temperature_start, self.config.temperature_end)

    def loss(
        self, model: nn.Module, batch: Batch, context: StepContext
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["images"].to(context.device, non_blocking=True)
        temperature = (
            self.temperature(context.step, context.total_steps) if context.training else self.config.temperature_end
        )
        generator = torch.Generator(context.device).manual_seed(context.generator_seed())
        with context.autocast():
            out = model(images, temperature=temperature, generator=generator)  # forward is the loss (DDP sees it)
        metrics = {"loss": out.loss, "reconstruction_loss": out.reconstruction_loss, "kl_loss": out.kl_loss}
        return out.loss, {name: value.detach() for name, value in metrics.items()}

    def tokens(self, batch: Batch) -> int:
        return int(batch["images"].shape[0]) * self.config.vae.fmap_size**2

    def scalars(self, step: int, total_steps: int) -> dict[str, float]:
        return {"temperature": self.temperature(step, total_steps)}

    def signature(self) -> dict[str, Any]:
        return self.config.vae.to_dict()

    def write_export(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        model = DiscreteVAE(self.config.vae)
        model.load_state_dict(state)
        model.save(directory)

    def read_export(self, directory: Path) -> nn.Module:
        return DiscreteVAE.load(directory).eval()

    @torch.no_grad()
    def sample(self, model: nn.Module, path: Path, device: torch.device) -> dict[str, float]:
        """Originals above their reconstructions, and how much of the codebook they use."""
        images = self.sample_images.to(device)
        ids = model.encode(images)  # type: ignore[operator]
        save_image_grid(torch.cat([images, model.decode(ids)]).cpu(), path, nrow=len(images), scale=4)  # type: ignore[operator]
        return codebook_usage(ids.cpu(), self.config.vae.num_tokens)


def sample_images(dataset: Any, count: int = 8) -> torch.Tensor:
    """``count`` images spread over a map-style dataset (unreadable ones skipped), for reconstruction grids."""
    wrapped = SkipUnreadable(dataset)
    positions = torch.linspace(0, len(wrapped) - 1, min(count, len(wrapped))).long().tolist()
    return torch.stack([wrapped[index].item["image"] for index in positions])


def micro_batch_size(batch_size: int, world_size: int, grad_accum_steps: int, field: str = "loop") -> int:
    from dalle_core.errors import ConfigError

    parts = world_size * grad_accum_steps
    if batch_size % parts:
        raise ConfigError(
            f"{field}.batch_size={batch_size} is not divisible by world_size {world_size} x {field}.grad_accum_steps "
            f"{grad_accum_steps} = {parts}"
        )
    return batch_size // parts


def train_vae(
    config: VAETrainConfig,
    dataset: Any,
    run_dir: Path,
    resume: bool = True,
    *,
    validation: Any = None,
    backend: Backend | None = None,
    logging: LoggingConfig | None = None,
    num_workers: int = 0,
    run_info: dict[str, Any] | None = None,
) -> DiscreteVAE:
    """Train a DiscreteVAE on the images of map-style ``dataset`` (items ``(image, caption)`` or dicts with
    ``image``); returns it in eval mode on CPU.

    Writes ``run_dir/samples/vae-step-N.png`` (originals above reconstructions), ``metrics.jsonl`` and checkpoints.
    With ``resume``, continues from the newest checkpoint in ``run_dir``. ``validation``, if given, is a map-style
    dataset whose reconstruction loss is measured every ``loop.sample_every`` steps.
    """
    from dalle_train.backends import SingleBackend

    backend = backend or SingleBackend()
    loop = config.loop
    micro = micro_batch_size(loop.batch_size, backend.world_size, loop.grad_accum_steps, "vae.loop")
    stream = MapBatchStream(SkipUnreadable(dataset), micro, backend.rank, backend.world_size, loop.seed, num_workers)
    task = VAETask(config, sample_images(validation if validation is not None else dataset))
    validate = None
    if validation is not None:
        held_out = SkipUnreadable(validation)

        def validate() -> Any:
            return evaluation_batches(held_out, micro, backend.rank, backend.world_size, loop.validation_batches)

    logger = RunLogger(run_dir, logging, enabled=backend.is_main)
    model = train_loop(
        task, stream, loop, config.optimizer, backend, logger, run_dir, validate, run_info, resume=resume
    )
    return model  # type: ignore[return-value,unused-ignore]
