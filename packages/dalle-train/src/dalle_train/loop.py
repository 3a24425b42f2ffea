"""The one training loop, shared by every model: a :class:`~dalle_train.task.TrainTask` says what a step computes,
a :class:`~dalle_train.backends.Backend` how processes cooperate, and the loop does the rest.

Per step: learning rate from the schedule; ``grad_accum_steps`` micro-batches under autocast (gradient sync only on
the last); clipping and a non-finite check (a step with NaN/inf loss or gradients is skipped and reported); the
optimizer step; the EMA update. Every ``log_every`` steps the metrics are averaged over processes and logged; every
``sample_every`` steps the validation loss is measured and the task draws samples; every ``checkpoint_every`` steps
(and at the end) a checkpoint is written. A run resumes from the newest checkpoint with the same weights, optimizer,
schedule, scaler, EMA, RNG and data position, so it ends exactly where an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.errors import CheckpointError, DalleError
from dalle_train.backends.base import Backend, LoopAwareBackend, LoopSettings
from dalle_train.checkpoints import (
    BACKEND_STATE_DIR,
    MODEL_DIR,
    latest_checkpoint,
    load_training_state,
    read_run_info,
    remove_stale_staging,
    rng_state,
    save_training_state,
    set_rng_state,
    write_checkpoint,
    write_run_info,
)
from dalle_train.config import LoopConfig, OptimizerConfig
from dalle_train.datasets.samples import batch_size_of
from dalle_train.datasets.streams import BatchStream
from dalle_train.ema import EMA
from dalle_train.optim import build_adamw
from dalle_train.precision import autocast, check_precision, make_grad_scaler
from dalle_train.progress import console
from dalle_train.run_logger import RunLogger
from dalle_train.schedules import PlateauState, learning_rate
from dalle_train.task import Batch, StepContext, TrainTask

__all__ = ["NonFiniteTrainingError", "StepContext", "TrainTask", "train_loop"]

REPORTED_SKIPS_PER_PROCESS = 20
Validation = Callable[[], Iterator[Batch]]


class NonFiniteTrainingError(DalleError):
    """Too many steps in a row had a NaN or infinite loss or gradient norm."""


@dataclass
class Counters:
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    skipped_samples: int = 0  # this process's unreadable samples
    reported_skips: int = 0


@dataclass
class Window:
    """Sums since the last log line (metrics, tokens, grad norms) and since the last evaluation (loss)."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0
    tokens: int = 0
    grad_norms: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    evaluation_loss: float | torch.Tensor = 0.0
    evaluation_steps: int = 0


def train_loop(
    task: TrainTask,
    train: BatchStream,
    loop: LoopConfig,
    optimizer_config: OptimizerConfig,
    backend: Backend,
    logger: RunLogger,
    run_dir: Path,
    validation: Validation | None = None,
    run_info: dict[str, Any] | None = None,
    resume: bool = True,
) -> nn.Module:
    """Train ``task`` to ``loop.steps`` and return the exported model (plain, CPU, eval mode) on every process."""
    check_precision(loop.precision, backend.device)
    if backend.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(run_dir)
    backend.barrier()
    training = _Training(task, train, loop, optimizer_config, backend, logger, run_dir, validation, run_info or {})
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        training.restore(checkpoint)
    logger.start(f"train {task.name}", loop.steps, training.step, training.info)
    try:
        training.run()
    finally:
        logger.close()
    backend.barrier()
    final = latest_checkpoint(run_dir)
    if final is None:  # pragma: no cover - the loop always writes the last step
        raise CheckpointError(f"{run_dir}: training ended without a checkpoint")
    return task.read_export(final / MODEL_DIR)


class _Training:
    """The state of one stage's training and the steps that change it."""

    def __init__(
        self,
        task: TrainTask,
        train: BatchStream,
        loop: LoopConfig,
        optimizer_config: OptimizerConfig,
        backend: Backend,
        logger: RunLogger,
        run_dir: Path,
        validation: Validation | None,
        run_info: dict[str, Any],
    ) -> None:
        self.task, self.train, self.loop, self.optimizer_config = task, train, loop, optimizer_config
        self.backend, self.logger, self.run_dir, self.validation = backend, logger, run_dir, validation
        if isinstance(backend, LoopAwareBackend):  # DeepSpeed builds its engine from these
            backend.configure_loop(LoopSettings.of(task.name, loop, optimizer_config, backend.world_size))
        torch.manual_seed(loop.seed)  # the same initial weights on every process (FSDP shards them as they are)
        model = task.build_model()
        if loop.compile:
            model.compile()  # in place: DDP/FSDP/DeepSpeed wrap it as usual, state-dict names are unchanged
        self.model, self.optimizer = backend.prepare(model, lambda m: build_adamw(m, optimizer_config))
        if backend.rank:
            torch.manual_seed(loop.seed + backend.rank)  # different dropout masks per process
        self.module = backend.unwrap(self.model)
        self.ema = EMA(self.module, loop.ema_decay) if loop.ema_decay > 0 else None
        self.scaler = make_grad_scaler(loop.precision, backend.device)
        self.plateau = PlateauState()
        self.counters = Counters()
        self.step = 0
        self.info = {"stage": task.name, "signature": task.signature(), **run_info}

    # ------------------------------------------------------------------------------------------------- resume

    def restore(self, checkpoint: Path) -> None:
        _check_signature(checkpoint, self.info["signature"])
        backend = self.backend
        backend.load(checkpoint / BACKEND_STATE_DIR, self.model, self.optimizer)
        saved = load_training_state(checkpoint)
        self.step = int(saved["step"])
        self.counters.nonfinite_steps = int(saved["counters"]["nonfinite_steps"])
        skipped = saved["counters"]["skipped_samples"]
        same_world = len(skipped) == backend.world_size
        self.counters.skipped_samples = int(skipped[backend.rank]) if same_world else sum(skipped) * backend.is_main
        self.plateau.load_state_dict(saved["plateau"])
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        if self.ema is not None:
            exported = self.task.read_export(checkpoint / MODEL_DIR).state_dict()
            self.ema.load_full_state_dict(exported, int(saved["ema_updates"]))
        self.train.load_state_dict(saved["data"])
        if len(saved["rng"]) == backend.world_size:
            set_rng_state(saved["rng"][backend.rank], backend.device)
        else:  # another number of processes: fresh but reproducible generators
            torch.manual_seed(self.loop.seed + 7919 * self.step + backend.rank)
        self.logger.message(f"resuming {self.task.name} from {checkpoint} (step {self.step} of {self.loop.steps})")

    # ------------------------------------------------------------------------------------------------- steps

    def run(self) -> None:
        loop = self.loop
        window = Window()
        self.model.train()
        while self.step < loop.steps:
            self._train_step(window)
            done = self.step
            if done % loop.log_every == 0 or done == loop.steps:
                self._log(window)
                window = Window(evaluation_loss=window.evaluation_loss, evaluation_steps=window.evaluation_steps)
            if done % loop.sample_every == 0 or done == loop.steps:
                self._evaluate(window)
                window.evaluation_loss, window.evaluation_steps = 0.0, 0
            if done % loop.checkpoint_every == 0 or done == loop.steps:
                self._save()

    def _train_step(self, window: Window) -> None:
        loop, backend, device = self.loop, self.backend, self.backend.device
        lr = learning_rate(self.step, loop.steps, self.optimizer_config, self.plateau.scale)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        step_metrics: dict[str, torch.Tensor] = {}
        for micro in range(loop.grad_accum_steps):
            batch = next(self.train)
            self._report_skips(batch)
            context = StepContext(
                self.step, micro, loop.steps, loop.seed, backend.rank, device, lambda: autocast(loop.precision, device)
            )
            last = micro == loop.grad_accum_steps - 1
            with contextlib.nullcontext() if last else backend.no_sync(self.model):
                loss, metrics = self.task.loss(self.model, batch, context)
                backend.backward(loss / loop.grad_accum_steps, self.scaler)
            for name, value in metrics.items():
                step_metrics[name] = step_metrics.get(name, 0.0) + value.detach().float() / loop.grad_accum_steps
            window.tokens += self.task.tokens(batch)
        result = backend.step(self.model, self.optimizer, self.scaler, self.optimizer_config.grad_clip)
        self.step += 1
        window.metrics["lr"] = torch.tensor(lr)  # the latest rate, not averaged
        if result.applied:
            self.counters.nonfinite_in_a_row = 0
            if self.ema is not None:
                self.ema.update(self.module)
            for name, value in step_metrics.items():
                window.metrics[name] = window.metrics.get(name, 0.0) + value
            window.steps += 1
            window.grad_norms.append(result.grad_norm)
            window.evaluation_loss = window.evaluation_loss + step_metrics["loss"]
            window.evaluation_steps += 1
        else:
            self._nonfinite(result.grad_norm)
        self.logger.advance()

    def _nonfinite(self, grad_norm: float) -> None:
        counters = self.counters
        counters.nonfinite_steps += 1
        counters.nonfinite_in_a_row += 1
        self.logger.message(
            f"[yellow]{self.task.name} step {self.step}: non-finite loss or gradients (grad norm {grad_norm}); "
            f"step skipped ({counters.nonfinite_steps} so far)"
        )
        if counters.nonfinite_in_a_row >= self.loop.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"{counters.nonfinite_in_a_row} steps in a row had non-finite loss or gradients (last at step "
                f"{self.step}); lower optimizer.lr, use loop.precision=bf16/fp32, or check the data"
            )

    def _report_skips(self, batch: Batch) -> None:
        reasons = batch.get("skipped") or []
        self.counters.skipped_samples += len(reasons)
        prefix = f"[rank {self.backend.rank}] " if self.backend.world_size > 1 else ""
        for reason in reasons:  # every process reports its own skips (the logger prints on the main one only)
            if self.counters.reported_skips >= REPORTED_SKIPS_PER_PROCESS:
                break
            console.print(f"[yellow]{prefix}skipped unreadable sample: {reason}", highlight=False)
            self.counters.reported_skips += 1
            if self.counters.reported_skips == REPORTED_SKIPS_PER_PROCESS:
                console.print(f"[yellow]{prefix}further unreadable samples are only counted (skipped_samples)")

    # ------------------------------------------------------------------------------------------------- reports

    def _log(self, window: Window) -> None:
        backend, device = self.backend, self.backend.device
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        lr = float(window.metrics.pop("lr"))
        names = sorted(window.metrics)
        record: dict[str, float] = {}
        if names:
            means = torch.stack([window.metrics[name] for name in names]) / max(window.steps, 1)
            record.update(zip(names, backend.all_reduce_mean(means).tolist(), strict=True))
        totals = backend.all_reduce_sum(
            torch.tensor([float(window.tokens), float(self.counters.skipped_samples)], device=device)
        )
        record["lr"] = lr
        if window.grad_norms:
            record["grad_norm"] = sum(window.grad_norms) / len(window.grad_norms)
        record["tokens_per_s"] = round(float(totals[0]) / elapsed, 1)
        record["skipped_steps"] = self.counters.nonfinite_steps
        record["skipped_samples"] = int(totals[1])
        record.update(self.task.scalars(self.step - 1, self.loop.steps))
        status = f"loss {record.get('loss', math.nan):.4f}  {record['tokens_per_s']:,.0f} tok/s"
        self.logger.log(self.step, record, status)

    def _evaluate(self, window: Window) -> None:
        measured = evaluate(self.task, self.model, self.backend, self.loop, self.validation) if self.validation else {}
        if self.optimizer_config.schedule == "plateau":
            mean_train = self.backend.all_reduce_mean(
                torch.as_tensor(window.evaluation_loss, device=self.backend.device) / max(window.evaluation_steps, 1)
            )
            watched = measured.get("val_loss", float(mean_train))
            if self.plateau.observe(watched, self.optimizer_config):
                self.logger.message(f"{self.task.name} step {self.step}: loss plateaued; LR scale {self.plateau.scale}")
        path = self.run_dir / "samples" / f"{self.task.name}-step-{self.step:06d}.png"
        measured.update(self._draw_samples(path))
        if measured:
            self.logger.log(self.step, measured)
        self.model.train()

    def _full_export_state(self) -> dict[str, torch.Tensor]:
        """What ``model/`` holds: the EMA weights if on, else the trained ones (collective; full on main only)."""
        if self.ema is not None:
            return self.ema.full_state_dict(self.module)
        return self.backend.full_state_dict(self.model)

    def _draw_samples(self, path: Path) -> dict[str, float]:
        """Samples drawn by the main process on an unsharded copy of the (EMA) weights."""
        state = self._full_export_state()
        metrics: dict[str, float] = {}
        if self.backend.is_main:
            plain = self.task.build_model()
            plain.load_state_dict(state)
            metrics = self.task.sample(plain.to(self.backend.device).eval(), path, self.backend.device)
        self.backend.barrier()
        return metrics

    # ------------------------------------------------------------------------------------------------- save

    def _save(self) -> None:
        backend = self.backend

        def write_parts(staging: Path) -> None:
            backend.save(staging / BACKEND_STATE_DIR, self.model, self.optimizer)
            export = self._full_export_state()
            rngs = backend.all_gather_object(rng_state(backend.device))
            data = backend.all_gather_object(self.train.state_dict())
            skipped = backend.all_gather_object(self.counters.skipped_samples)
            if not backend.is_main:
                return
            self.task.write_export(staging / MODEL_DIR, export)
            counters = {"nonfinite_steps": self.counters.nonfinite_steps, "skipped_samples": skipped}
            save_training_state(
                staging,
                {
                    "step": self.step,
                    "counters": counters,
                    "plateau": self.plateau.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "ema_updates": self.ema.updates if self.ema is not None else 0,
                    "rng": rngs,
                    "data": data,
                    "world_size": backend.world_size,
                },
            )
            info = {**self.info, "step": self.step, "backend": backend.name, "world_size": backend.world_size}
            write_run_info(staging, info)

        write_checkpoint(
            self.run_dir, self.step, backend.is_main, backend.broadcast_object, write_parts, self.loop.keep_last
        )
        backend.barrier()


def evaluate(
    task: TrainTask, model: nn.Module, backend: Backend, loop: LoopConfig, validation: Validation
) -> dict[str, float]:
    """Mean validation metrics (``val_`` prefixed), weighted by batch size, over every process's share."""
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    batches = validation()
    with torch.no_grad():
        for number in range(loop.validation_batches):
            batch = next(batches, None)
            # Every process must run the same number of forward passes (FSDP gathers weights in each): stop as soon
            # as any process has run out.
            have = backend.all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0], device=backend.device))
            if batch is None or int(have.item()) < backend.world_size:
                break
            context = StepContext(
                number,
                0,
                loop.steps,
                loop.seed + 1,
                backend.rank,
                backend.device,
                lambda: autocast(loop.precision, backend.device),
                training=False,
            )
            _, metrics = task.loss(model, batch, context)
            size = batch_size_of(batch)
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() * size
            count += size
    model.train()
    if not sums:
        return {}
    names = sorted(sums)
    values = torch.stack([*(sums[name] for name in names), torch.tensor(float(count), device=backend.device)])
    totals = backend.all_reduce_sum(values)
    return {f"val_{name}": float(totals[i] / totals[-1]) for i, name in enumerate(names)}


def _check_signature(checkpoint: Path, signature: dict[str, Any]) -> None:
    saved = read_run_info(checkpoint).get("signature")
    if saved is None:
        return
    saved_plain, current = json.loads(json.dumps(saved)), json.loads(json.dumps(signature))
    if saved_plain == current:
        return
    different = sorted(key for key in set(saved_plain) | set(current) if saved_plain.get(key) != current.get(key))
    key = different[0]
    raise CheckpointError(
        f"{checkpoint} was trained with {key}={saved_plain.get(key)!r} but the config now says {current.get(key)!r}; "
        f"restore the config or start afresh (--fresh)"
    )
