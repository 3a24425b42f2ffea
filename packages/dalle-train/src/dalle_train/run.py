"""A whole training run from a :class:`~dalle_train.run_config.RunConfig`: the VAE stage, then the DALLE stage.

``OUTPUT/config.yaml``  the resolved config
``OUTPUT/vae/``         the VAE stage (checkpoints, samples, metrics.jsonl)
``OUTPUT/dalle/``       the transformer stage
``OUTPUT/model/``       the final generation bundle (``dalle generate --checkpoint OUTPUT/model``)

Everything that can be checked is checked before any work: the config, the data, the tokenizers and their fit to the
model, batch sizes against the number of processes, precision against the device. Rerunning the same command
resumes every stage from its newest checkpoint (a finished stage is only loaded).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dalle_core import registry
from dalle_core.config import to_dict, write_config_file
from dalle_core.errors import DalleError
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_tokenizers import build_text_tokenizer as build_tokenizer
from dalle_train.backends import Backend, make_backend
from dalle_train.backends.base import LoopAwareBackend, LoopSettings
from dalle_train.bundle import save_bundle
from dalle_train.checkpoints import MODEL_DIR, latest_checkpoint
from dalle_train.datasets.build import (
    CaptionEncoder,
    DataSources,
    first_items,
    open_sources,
    train_stream,
    validation_batches,
)
from dalle_train.loop import train_loop
from dalle_train.run_config import RunConfig
from dalle_train.run_logger import RunLogger
from dalle_train.vae_trainer import VAETask, micro_batch_size
from dalle_train.validation import (
    ImageTokenizerFacts,
    batch_problems,
    data_problems,
    logging_problems,
    model_problems,
    precision_problems,
    raise_problems,
    text_problems,
)

VAE_DIR, DALLE_DIR, BUNDLE_DIR = "vae", "dalle", "model"


@dataclass
class RunResult:
    output: Path
    vae_dir: Path | None
    bundle_dir: Path | None


@dataclass
class Prepared:
    """What the checks built and the stages reuse."""

    text_tokenizer: TextTokenizer | None
    image_tokenizer: ImageTokenizer | None  # a pretrained one, or the finished VAE stage of this output
    facts: ImageTokenizerFacts | None
    sources: DataSources | None


def build_text_tokenizer(config: RunConfig) -> TextTokenizer:
    tokenizer = config.tokenizer
    # A directory written by a tokenizer's save() rebuilds itself; anything else is the tokenizer's own file
    # (a YouTokenToMe .model, a tokenizer.json, CLIP's vocabulary), as DALLE-pytorch's --bpe_path was.
    if tokenizer.path is not None and (Path(tokenizer.path) / registry.SPEC_FILE).is_file():
        return registry.load_text_tokenizer(tokenizer.path)
    return build_tokenizer(tokenizer.kind, tokenizer.path, **tokenizer.options)


def _existing_vae(output: Path) -> ImageTokenizer | None:
    checkpoint = latest_checkpoint(output / VAE_DIR)
    return registry.load_image_tokenizer(checkpoint / MODEL_DIR) if checkpoint is not None else None


def prepare(config: RunConfig, output: Path, backend: Backend) -> Prepared:
    """Build tokenizers and open the data, collecting every problem; raises ConfigError listing them all."""
    problems: list[str] = []
    text_tokenizer = image_tokenizer = facts = sources = token_index = None
    try:
        text_tokenizer = build_text_tokenizer(config)
    except DalleError as error:
        problems.append(f"tokenizer: {error}")

    if "vae" in config.stages:
        if config.image_tokenizer is not None:
            problems.append("image_tokenizer is set but stages include vae; drop one of them")
        vae = config.vae.vae
        facts = ImageTokenizerFacts(vae.image_size, vae.num_tokens, vae.fmap_size, vae.channels, "vae.vae")
    else:
        try:
            if config.image_tokenizer is not None:
                image_tokenizer = registry.load_image_tokenizer(config.image_tokenizer)
                where = "image_tokenizer"
            else:
                image_tokenizer = _existing_vae(output)
                where = f"{output / VAE_DIR}"
                if image_tokenizer is None:
                    problems.append(
                        "image_tokenizer: the dalle stage needs an image tokenizer; set image_tokenizer=DIR or add "
                        "vae to stages"
                    )
        except DalleError as error:
            problems.append(f"image_tokenizer: {error}")
        if image_tokenizer is not None:
            facts = ImageTokenizerFacts(
                image_tokenizer.image_size,
                image_tokenizer.num_tokens,
                image_tokenizer.fmap_size,
                image_tokenizer.channels,
                where,
            )

    if facts is not None:
        try:
            sources = open_sources(config.data, facts.image_size)
            if config.data.kind == "webdataset" and len(sources.train) < backend.world_size:
                problems.append(
                    f"data.path: {len(sources.train)} shards cannot be split over {backend.world_size} processes"
                )
            if config.data.kind == "token_shards":
                shards = getattr(sources.train, "dataset", sources.train)  # a validation split wraps the shards
                token_index = shards.index
        except DalleError as error:
            message = str(error)
            problems.append(message if message.startswith("data.") else f"data.path: {message}")

    problems += data_problems(config, facts, token_index)
    problems += text_problems(config, text_tokenizer, token_index)
    problems += model_problems(config, text_tokenizer, facts)
    for stage in config.stages:
        loop = config.vae.loop if stage == "vae" else config.dalle.loop
        problems += batch_problems(stage, loop, backend.world_size)
        problems += precision_problems(stage, loop, backend.device)
        if isinstance(backend, LoopAwareBackend):  # e.g. a DeepSpeed JSON that contradicts the loop
            optimizer = config.vae.optimizer if stage == "vae" else config.dalle.optimizer
            try:
                backend.configure_loop(LoopSettings.of(stage, loop, optimizer, backend.world_size))
            except DalleError as error:
                problems.append(str(error))
    problems += logging_problems(config)
    raise_problems(problems)
    return Prepared(text_tokenizer, image_tokenizer, facts, sources)


def run_training(
    config: RunConfig, output: str | Path, resume: bool = True, backend: Backend | None = None
) -> RunResult:
    """Run the configured stages into ``output``; ``resume=False`` deletes what an earlier run left there."""
    output = Path(output)
    owns_backend = backend is None
    backend = backend or make_backend(config.backend)
    try:
        if not resume and backend.is_main and output.exists():
            shutil.rmtree(output)
        backend.barrier()
        prepared = prepare(config, output, backend)
        assert prepared.sources is not None and prepared.facts is not None
        if backend.is_main:
            output.mkdir(parents=True, exist_ok=True)
            write_config_file(config, output / "config.yaml")
        image_tokenizer = prepared.image_tokenizer
        vae_dir = None
        if "vae" in config.stages:
            image_tokenizer = _vae_stage(config, prepared, output, backend, resume)
            vae_dir = latest_checkpoint(output / VAE_DIR)
        bundle_dir = None
        if "dalle" in config.stages:
            assert image_tokenizer is not None and prepared.text_tokenizer is not None
            bundle_dir = _dalle_stage(config, prepared, image_tokenizer, output, backend, resume)
        return RunResult(output, vae_dir, bundle_dir)
    finally:
        if owns_backend:
            backend.close()


def _run_info(config: RunConfig) -> dict[str, Any]:
    return {"run_config": to_dict(config)}


def _vae_stage(config: RunConfig, prepared: Prepared, output: Path, backend: Backend, resume: bool) -> ImageTokenizer:
    stage, sources, size = config.vae, prepared.sources, prepared.facts.image_size  # type: ignore[union-attr]
    assert sources is not None
    micro = micro_batch_size(stage.loop.batch_size, backend.world_size, stage.loop.grad_accum_steps, "vae.loop")
    import torch

    images = torch.stack([item["image"] for item in first_items(sources, size, 8)])
    task = VAETask(stage, images)
    stream = train_stream(sources, config.data, size, micro, backend, stage.loop.seed, None)
    validate = validation_batches(sources, size, micro, backend, stage.loop.validation_batches, None)
    logger = RunLogger(output / VAE_DIR, config.logging, enabled=backend.is_main)
    return train_loop(  # type: ignore[return-value]
        task,
        stream,
        stage.loop,
        stage.optimizer,
        backend,
        logger,
        output / VAE_DIR,
        validate,
        _run_info(config),
        resume,
    )


def _dalle_stage(
    config: RunConfig,
    prepared: Prepared,
    image_tokenizer: ImageTokenizer,
    output: Path,
    backend: Backend,
    resume: bool,
) -> Path:
    from dalle_train.dalle_trainer import DALLETask

    stage, sources, size = config.dalle, prepared.sources, prepared.facts.image_size  # type: ignore[union-attr]
    text_tokenizer = prepared.text_tokenizer
    assert sources is not None and text_tokenizer is not None
    micro = micro_batch_size(stage.loop.batch_size, backend.world_size, stage.loop.grad_accum_steps, "dalle.loop")
    prompts = list(stage.sample_prompts)
    if not prompts:
        prompts = list(dict.fromkeys(item["caption"] for item in first_items(sources, size, 8)))
    transform = (
        None
        if not sources.has_images
        else CaptionEncoder(text_tokenizer, stage.text_seq_len, config.data.truncate_captions)
    )
    task = DALLETask(stage, text_tokenizer, image_tokenizer, prompts, backend.device, to_dict(config))
    stream = train_stream(sources, config.data, size, micro, backend, stage.loop.seed, transform)
    validate = validation_batches(sources, size, micro, backend, stage.loop.validation_batches, transform)
    logger = RunLogger(output / DALLE_DIR, config.logging, enabled=backend.is_main)
    from dalle_transformer import native

    note = native.fallback_note(backend.device, "training")
    if note is not None:
        logger.message(note)
    model = train_loop(
        task,
        stream,
        stage.loop,
        stage.optimizer,
        backend,
        logger,
        output / DALLE_DIR,
        validate,
        _run_info(config),
        resume,
    )
    bundle = output / BUNDLE_DIR
    if backend.is_main:
        save_bundle(bundle, model, text_tokenizer, image_tokenizer, training_config=to_dict(config))  # type: ignore[arg-type,unused-ignore]
    backend.barrier()
    return bundle
