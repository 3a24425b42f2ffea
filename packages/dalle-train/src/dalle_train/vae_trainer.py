"""Single-process training loop for the DiscreteVAE, resumable, with reconstruction grids and codebook usage."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from dalle_core.checkpoint import load_weights
from dalle_core.config import to_dict
from dalle_core.images import save_image_grid
from dalle_train.checkpoints import MODEL_DIR, latest_checkpoint, load_training_state, save_checkpoint
from dalle_train.config import VAETrainConfig
from dalle_train.progress import MetricsLog, console, make_progress
from dalle_train.schedules import gumbel_temperature, learning_rate
from dalle_vae import DiscreteVAE
from dalle_vae.usage import codebook_usage


def image_batch(dataset: Dataset, indices: torch.Tensor) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in indices.tolist()])


def train_vae(config: VAETrainConfig, dataset: Dataset, run_dir: Path, resume: bool = True) -> DiscreteVAE:
    """Train a DiscreteVAE on the images of ``dataset`` (items are ``(image, caption)``); returns it in eval mode.

    Writes ``run_dir/samples/vae-step-N.png`` (originals above reconstructions), ``metrics.jsonl`` and checkpoints.
    With ``resume``, continues from the newest checkpoint in ``run_dir``.
    """
    loop = config.loop
    torch.manual_seed(loop.seed)
    data_generator = torch.Generator().manual_seed(loop.seed)
    model = DiscreteVAE(config.vae)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.lr,
        betas=config.optimizer.betas,
        weight_decay=config.optimizer.weight_decay,
    )
    start = 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        _, state = load_weights(checkpoint / MODEL_DIR)
        model.load_state_dict(state)
        start = int(load_training_state(checkpoint, optimizer, data_generator)["step"])
        console.print(f"resuming VAE training from {checkpoint} (step {start})")
    count = len(dataset)  # type: ignore[arg-type]
    fixed = image_batch(dataset, torch.linspace(0, count - 1, min(8, count)).long())
    log = MetricsLog(run_dir / "metrics.jsonl")
    model.train()
    with make_progress() as progress:
        task = progress.add_task("train VAE", total=loop.steps, completed=start, status="")
        for step in range(start, loop.steps):
            lr = learning_rate(step, loop.steps, config.optimizer)
            for group in optimizer.param_groups:
                group["lr"] = lr
            temperature = gumbel_temperature(step, loop.steps, config.temperature_start, config.temperature_end)
            images = image_batch(dataset, torch.randint(0, count, (loop.batch_size,), generator=data_generator))
            out = model.loss(images, temperature=temperature)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            optimizer.step()
            done = step + 1
            if done % loop.log_every == 0 or done == loop.steps:
                recon = float(out.reconstruction_loss.detach())
                log.write(
                    done, vae_loss=float(out.loss.detach()), reconstruction_loss=recon, temperature=temperature, lr=lr
                )
                progress.update(task, status=f"recon {recon:.4f} temp {temperature:.3f}")
            if done % loop.sample_every == 0 or done == loop.steps:
                model.eval()
                ids = model.encode(fixed)
                save_image_grid(
                    torch.cat([fixed, model.decode(ids)]),
                    run_dir / "samples" / f"vae-step-{done:06d}.png",
                    nrow=len(fixed),
                    scale=4,
                )
                log.write(done, **codebook_usage(ids, model.num_tokens))
                model.train()
            if done % loop.checkpoint_every == 0 or done == loop.steps:
                save_checkpoint(
                    run_dir,
                    done,
                    model.save,
                    optimizer,
                    data_generator,
                    loop.keep_last,
                    extra={"config": to_dict(config)},
                )
            progress.advance(task)
    model.eval()
    return model
