"""Single-process training loop for the DALLE transformer on pre-tokenized data, resumable, with sample grids."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dalle_core.checkpoint import load_weights
from dalle_core.config import from_dict, to_dict
from dalle_core.images import save_image_grid
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_train.bundle import check_compatible, write_bundle
from dalle_train.checkpoints import MODEL_DIR, latest_checkpoint, load_training_state, save_checkpoint
from dalle_train.config import DALLETrainConfig
from dalle_train.progress import MetricsLog, console, make_progress
from dalle_train.schedules import learning_rate
from dalle_train.tokenized import TokenData
from dalle_transformer import DALLE, DALLEConfig


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
    totals = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}
    for start in range(0, len(data), batch_size):
        stop = min(len(data), start + batch_size)
        out = model.loss(data.text_ids[start:stop], data.image_ids[start:stop])
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
    text_ids = text_tokenizer.encode(list(prompts), model.config.text_seq_len)
    generator = torch.Generator().manual_seed(seed)
    ids = model.generate_image_ids(text_ids, temperature=temperature, top_k=top_k, generator=generator)
    save_image_grid(image_tokenizer.decode(ids), path, scale=4)
    model.train(was_training)


def train_dalle(
    config: DALLETrainConfig,
    data: TokenData,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    run_dir: Path,
    sample_prompts: Sequence[str] = (),
    validation: TokenData | None = None,
    resume: bool = True,
) -> DALLE:
    """Train the transformer on ``data``; returns it in eval mode.

    Every ``sample_every`` steps: a grid for ``sample_prompts`` in ``run_dir/samples/`` and the validation loss.
    Checkpoints are generation bundles plus optimizer state, so any of them works with ``dalle generate``.
    """
    loop = config.loop
    model_config = build_model_config(config, text_tokenizer, image_tokenizer)
    torch.manual_seed(loop.seed)
    data_generator = torch.Generator().manual_seed(loop.seed)
    model = DALLE(model_config)
    check_compatible(model, text_tokenizer, image_tokenizer)
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
        console.print(f"resuming DALLE training from {checkpoint} (step {start})")
    log = MetricsLog(run_dir / "metrics.jsonl")
    training_config = to_dict(config)

    def write_model(directory: Path) -> None:
        write_bundle(directory, model, text_tokenizer, image_tokenizer, training_config)

    tokens_per_step = loop.batch_size * (model_config.text_seq_len + model_config.image_fmap_size**2)
    model.train()
    with make_progress() as progress:
        task = progress.add_task("train DALLE", total=loop.steps, completed=start, status="")
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, loop.steps):
            lr = learning_rate(step, loop.steps, config.optimizer)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(0, len(data), (loop.batch_size,), generator=data_generator)
            out = model.loss(data.text_ids[index], data.image_ids[index])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if config.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.grad_clip)
            optimizer.step()
            done = step + 1
            window_steps += 1
            if done % loop.log_every == 0 or done == loop.steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                window_start, window_steps = time.perf_counter(), 0
                metrics = {
                    "loss": float(out.loss.detach()),
                    "text_loss": float(out.text_loss.detach()),
                    "image_loss": float(out.image_loss.detach()),
                    "lr": lr,
                    "tokens_per_s": round(tokens_per_s),
                }
                log.write(done, **metrics)
                progress.update(task, status=f"img loss {metrics['image_loss']:.3f} {tokens_per_s:,.0f} tok/s")
            if done % loop.sample_every == 0 or done == loop.steps:
                if validation is not None:
                    log.write(done, **validation_loss(model, validation))
                if sample_prompts:
                    sample_grid(
                        model,
                        text_tokenizer,
                        image_tokenizer,
                        sample_prompts,
                        run_dir / "samples" / f"dalle-step-{done:06d}.png",
                        config.sample_temperature,
                        config.sample_top_k,
                    )
            if done % loop.checkpoint_every == 0 or done == loop.steps:
                save_checkpoint(run_dir, done, write_model, optimizer, data_generator, loop.keep_last)
            progress.advance(task)
    model.eval()
    return model
