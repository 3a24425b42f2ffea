"""``dalle clip train``: a small CLIP trained on your own image/caption pairs, for reranking and CLIP score.

It uses open_clip's own ``CLIP`` model class, tokenizer and ``ClipLoss``, and saves an open_clip ``local-dir``
(``open_clip_config.json`` + ``open_clip_model.safetensors``), so ``open_clip.create_model("local-dir:DIR")`` and
:func:`dalle_eval.clip.load_clip` load it with no code of ours.

Batches hold distinct captions: a contrastive loss treats every other caption in the batch as a negative, and on a
dataset with few distinct captions (the shapes training split has 153) a batch drawn at random would often offer an
image a copy of its own caption as a "wrong" answer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dalle_core.checkpoint import atomic_directory, write_json
from dalle_core.config import to_dict
from dalle_core.errors import ConfigError, DataError
from dalle_eval.clip import CONFIG_FILE, WEIGHTS_FILE, import_open_clip
from dalle_eval.image_folder import ImageTextPairs

# open_clip's defaults (OpenAI's statistics); kept so a scorer preprocesses exactly as training did.
_MEAN = (0.48145466, 0.4578275, 0.40821073)
_STD = (0.26862954, 0.26130258, 0.27577711)
_VOCAB_SIZE = 49408  # open_clip's SimpleTokenizer (CLIP BPE), shipped inside the open_clip package


@dataclass(frozen=True)
class ClipTrainConfig:
    """A tiny ViT CLIP; the defaults learn the shapes captions' colours in a few hundred CPU steps."""

    image_size: int = 32
    patch_size: int = 8
    embed_dim: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 2
    context_length: int = 32
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "embed_dim", "width", "layers", "heads", "context_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ConfigError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.steps < 1 or self.batch_size < 2:
            raise ConfigError(f"steps must be >= 1 and batch_size >= 2, got {self.steps} and {self.batch_size}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError(f"lr must be > 0 and warmup_steps >= 0, got {self.lr} and {self.warmup_steps}")

    def model_config(self) -> dict:
        """open_clip's ``model_cfg`` for ``CLIP(**cfg)``."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.width,
                "layers": self.layers,
                "head_width": self.width // self.heads,
                "mlp_ratio": 2.0,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": _VOCAB_SIZE,
                "width": self.width,
                "heads": self.heads,
                "layers": self.layers,
                "mlp_ratio": 2.0,
            },
        }

    def preprocess_config(self) -> dict:
        return {
            "size": self.image_size,
            "mean": list(_MEAN),
            "std": list(_STD),
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        }


def _learning_rate(config: ClipTrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _distinct_caption_batches(captions: tuple[str, ...], batch_size: int, generator: torch.Generator):
    """Yield index batches with no caption twice: random captions, then a random image of each."""
    groups: dict[str, list[int]] = {}
    for index, caption in enumerate(captions):
        groups.setdefault(caption, []).append(index)
    members = list(groups.values())
    size = min(batch_size, len(members))
    while True:
        chosen = torch.randperm(len(members), generator=generator)[:size].tolist()
        yield [members[c][int(torch.randint(len(members[c]), (1,), generator=generator))] for c in chosen]


def train_clip(
    config: ClipTrainConfig,
    data: ImageTextPairs,
    output: str | Path,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a CLIP on ``data`` and write it to ``output`` (replaced atomically); returns ``output``."""
    open_clip = import_open_clip()
    if len(set(data.captions)) < 2:
        raise DataError(f"contrastive training needs at least 2 distinct captions, got {len(set(data.captions))}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = open_clip.CLIP(**config.model_config())
    loss_fn = open_clip.ClipLoss()
    preprocess = open_clip.image_transform(
        config.image_size, is_train=False, mean=_MEAN, std=_STD, interpolation="bicubic", resize_mode="shortest"
    )
    # The scorer will see 8-bit pictures through this transform; train on exactly that.
    from dalle_core.images import to_pil

    pixels = torch.stack([preprocess(to_pil(image)) for image in data.images])
    tokens = open_clip.SimpleTokenizer(context_length=config.context_length)(list(data.captions))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    batches = _distinct_caption_batches(data.captions, config.batch_size, generator)
    history = []
    started = time.perf_counter()
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        index = torch.tensor(next(batches))
        image_features, text_features, logit_scale = model(pixels[index], tokens[index])
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as open_clip's trainer does
        history.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, config.steps // 10) == 0:
            log(f"step {step + 1}/{config.steps}  loss {history[-1]:.3f}")
    model.eval()

    from safetensors.torch import save_file

    output = Path(output)
    with atomic_directory(output) as staging:
        write_json(
            staging / CONFIG_FILE,
            {"model_cfg": config.model_config(), "preprocess_cfg": config.preprocess_config()},
        )
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, staging / WEIGHTS_FILE)
        write_json(staging / "clip_train_config.json", to_dict(config))
        summary = {
            "pairs": len(data),
            "distinct_captions": len(set(data.captions)),
            "first_loss": history[0],
            "final_loss": sum(history[-10:]) / len(history[-10:]),
            "seconds": round(time.perf_counter() - started, 1),
        }
        (staging / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return output
