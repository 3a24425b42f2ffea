"""CLIP models through open_clip, from local files only: embeddings, cosine similarity and CLIP score.

A model is named in one of two ways, neither of which downloads anything:

- a directory holding ``open_clip_config.json`` and weights (what ``dalle clip train`` writes, or an open_clip
  ``local-dir`` export), loaded as ``open_clip.create_model("local-dir:DIR")``;
- an open_clip architecture name (``open_clip.list_models()``, e.g. ``ViT-B-32``) plus a local checkpoint file of it,
  loaded as ``open_clip.create_model(arch, pretrained=FILE)``. Pretrained *tags* (``openai``, ``laion2b_...``) are
  refused because open_clip would download them. Architectures with a Hugging Face text tower also need that
  tokenizer in the local Hugging Face cache.

Images are preprocessed by the model's own open_clip transform (resize, centre crop, normalise) applied to the 8-bit
picture, i.e. exactly what the model would see from a saved PNG.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dalle_core.errors import CheckpointError, ConfigError, ShapeError
from dalle_core.extras import require_extra
from dalle_core.images import to_pil
from dalle_eval.weights import require_weights

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


def import_open_clip() -> Any:
    """``open_clip``, or a :class:`MissingExtraError` naming the ``clip`` extra."""
    return require_extra("open_clip", "dalle-eval", "clip")


class ClipScorer:
    """An open_clip model with its image preprocessing and tokenizer; every embedding is unit length, on the CPU.

    ``model`` is any module with open_clip's ``encode_image`` and ``encode_text``.
    """

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Any], torch.Tensor],
        tokenizer: Callable[[Sequence[str]], torch.Tensor],
        name: str,
        batch_size: int = 64,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, 3, H, W]`` in [0, 1] -> the model's normalised input ``float[B, 3, S, S]``."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ShapeError(f"expected images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        return torch.stack([self.preprocess(to_pil(image.cpu()).convert("RGB")) for image in images])

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings ``float32[B, D]``."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.prepare_images(images[start : start + self.batch_size]).to(self.device)
            parts.append(torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text embeddings ``float32[B, D]``."""
        parts = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start : start + self.batch_size])).to(self.device)
            parts.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(parts)

    def cosine(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of ``images[i]`` with ``texts[i]``: ``float32[B]`` in [-1, 1]."""
        if len(images) != len(texts):
            raise ShapeError(f"expected one text per image, got {len(images)} images and {len(texts)} texts")
        return (self.embed_images(images) * self.embed_texts(texts)).sum(dim=-1)


def clip_score(scorer: ClipScorer, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """CLIP score of each pair (Hessel et al. 2021, with w = 100): ``100 * max(cos, 0)``, ``float32[B]``."""
    return 100 * scorer.cosine(images, texts).clamp_min(0)


def load_clip(
    model: str | Path, weights: str | Path | None = None, device: torch.device | str = "cpu", batch_size: int = 64
) -> ClipScorer:
    """A :class:`ClipScorer` from a model directory, or from an architecture name and a local weights file."""
    open_clip = import_open_clip()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{path} is not a CLIP model directory: expected {CONFIG_FILE} beside the weights "
                "(written by `dalle clip train`)"
            )
        name = f"local-dir:{path.resolve()}"
        if weights is not None:
            raise ConfigError(f"a CLIP model directory ({path}) holds its own weights; do not also pass weights")
        pretrained = None
    else:
        name = str(model)
        if name not in open_clip.list_models():
            raise ConfigError(
                f"CLIP model {name!r} is neither a directory with {CONFIG_FILE} nor an open_clip architecture "
                f"(e.g. {', '.join(open_clip.list_models()[:3])}, ...; see open_clip.list_models())"
            )
        pretrained = str(
            require_weights(
                weights,
                f"CLIP {name}",
                f"pass a local checkpoint file of the {name} architecture (e.g. open_clip_pytorch_model.bin or "
                "open_clip_model.safetensors from the model's page) with --clip-weights; nothing is downloaded",
            )
        )
    try:
        network, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"could not load CLIP {model}: {str(error).splitlines()[0]}") from None
    return ClipScorer(network, preprocess, tokenizer, str(model), batch_size)
