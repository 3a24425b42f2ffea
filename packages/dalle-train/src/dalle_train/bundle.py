"""A generation bundle: everything ``dalle generate --checkpoint DIR`` needs, in one self-describing directory.

DIR/config.json          the transformer's DALLEConfig
DIR/model.safetensors    the transformer's weights
DIR/text_tokenizer/      saved by the text tokenizer (spec.json names its kind)
DIR/image_tokenizer/     saved by the image tokenizer (spec.json names its kind)
DIR/training_config.json the config that trained it (informational)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_core import registry
from dalle_core.checkpoint import atomic_directory, write_json
from dalle_core.errors import CheckpointError, VocabularyError
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_transformer import DALLE

TEXT_TOKENIZER_DIR = "text_tokenizer"
IMAGE_TOKENIZER_DIR = "image_tokenizer"
MODEL_DIR = "model"


@dataclass
class Bundle:
    model: DALLE
    text_tokenizer: TextTokenizer
    image_tokenizer: ImageTokenizer


def check_compatible(model: DALLE, text_tokenizer: TextTokenizer, image_tokenizer: ImageTokenizer) -> None:
    """Raise before any embedding lookup if the tokenizers do not fit the transformer's vocabularies."""
    config = model.config
    if config.num_text_tokens != text_tokenizer.vocab_size:
        raise VocabularyError(
            f"text tokenizer has {text_tokenizer.vocab_size} ids but the transformer expects num_text_tokens="
            f"{config.num_text_tokens}"
        )
    if config.text_pad_id != text_tokenizer.pad_id:
        raise VocabularyError(
            f"text tokenizer pads with id {text_tokenizer.pad_id} but the transformer expects text_pad_id="
            f"{config.text_pad_id}"
        )
    if config.num_image_tokens != image_tokenizer.num_tokens:
        raise VocabularyError(
            f"image tokenizer has {image_tokenizer.num_tokens} codes but the transformer expects num_image_tokens="
            f"{config.num_image_tokens}"
        )
    if config.image_fmap_size != image_tokenizer.fmap_size:
        raise VocabularyError(
            f"image tokenizer makes a {image_tokenizer.fmap_size}x{image_tokenizer.fmap_size} grid but the "
            f"transformer expects image_fmap_size={config.image_fmap_size}"
        )


def write_bundle(
    directory: Path,
    model: DALLE,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    training_config: dict[str, Any] | None = None,
) -> None:
    """Write a bundle into an existing, empty directory (call it inside ``atomic_directory``)."""
    check_compatible(model, text_tokenizer, image_tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    model.write_files(directory)
    text_tokenizer.save(directory / TEXT_TOKENIZER_DIR)
    image_tokenizer.save(directory / IMAGE_TOKENIZER_DIR)
    if training_config is not None:
        write_json(directory / "training_config.json", training_config)


def save_bundle(
    directory: str | Path,
    model: DALLE,
    text_tokenizer: TextTokenizer,
    image_tokenizer: ImageTokenizer,
    training_config: dict[str, Any] | None = None,
) -> None:
    """Atomically write a bundle to ``directory`` (replacing what was there)."""
    with atomic_directory(directory) as staging:
        write_bundle(staging, model, text_tokenizer, image_tokenizer, training_config)


def resolve_bundle_dir(directory: str | Path) -> Path:
    """Accept a bundle directory, or a training checkpoint directory that holds one under ``model/``."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint not found: {directory}")
    if (directory / MODEL_DIR / "config.json").is_file():
        return directory / MODEL_DIR
    if not (directory / "config.json").is_file():
        raise CheckpointError(
            f"{directory} is not a dalle checkpoint: expected config.json, model.safetensors, {TEXT_TOKENIZER_DIR}/ "
            f"and {IMAGE_TOKENIZER_DIR}/ (or a training checkpoint with them under {MODEL_DIR}/)"
        )
    return directory


def load_bundle(directory: str | Path) -> Bundle:
    """Load transformer and both tokenizers from a bundle (or a training checkpoint), in eval mode."""
    directory = resolve_bundle_dir(directory)
    for sub in (TEXT_TOKENIZER_DIR, IMAGE_TOKENIZER_DIR):
        if not (directory / sub).is_dir():
            raise CheckpointError(f"{directory} has no {sub}/ directory; it cannot be used for generation")
    model = DALLE.load(directory)
    text_tokenizer = registry.load_text_tokenizer(directory / TEXT_TOKENIZER_DIR)
    image_tokenizer = registry.load_image_tokenizer(directory / IMAGE_TOKENIZER_DIR)
    check_compatible(model, text_tokenizer, image_tokenizer)
    model.eval()
    if isinstance(image_tokenizer, torch.nn.Module):
        image_tokenizer.eval()
    return Bundle(model, text_tokenizer, image_tokenizer)
