"""``dalle eval``: draw images for prompts, optionally rerank them with CLIP, measure everything, write a report.

The report directory holds ``metrics.json``, ``index.html`` (each prompt beside its images, then the numbers),
``images/``, ``grid.png`` and ``generations.json``. Which metrics appear depends on what is available:

- always: the sampling options and counts;
- prompts that are shapes captions: the shapes checker's attribute accuracy (and its chance levels);
- a reference set (the shapes held-out split by default, or a folder): VAE reconstruction (MSE, PSNR, SSIM,
  codebook usage; LPIPS with its weights) and, when it has captions, the transformer's held-out cross-entropy;
- a CLIP model: CLIP score of the kept images (and of all candidates when reranking);
- FID Inception weights (or any feature extractor passed in code) and a reference set: FID and KID.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dalle_core.config import to_dict
from dalle_core.errors import ConfigError, DataError
from dalle_eval.clip import ClipScorer, load_clip
from dalle_eval.fid import FeatureExtractor
from dalle_eval.image_folder import ImageTextPairs, load_image_folder, shapes_pairs
from dalle_eval.inception import load_fid_inception
from dalle_eval.metrics import distribution_metrics, language_model_metrics, reconstruction_metrics
from dalle_eval.perceptual import Lpips, load_lpips
from dalle_eval.pipeline import Generation, SamplingOptions, device_of, generate, write_generation
from dalle_eval.report import write_report
from dalle_eval.rerank import rerank
from dalle_train.bundle import Bundle, load_bundle
from dalle_train.datasets.shapes import ShapeSpec, chance_levels, check_image, parse_caption, score
from dalle_train.tokenized import TokenData


@dataclass(frozen=True)
class EvalConfig:
    """What ``dalle eval`` measures. ``reference``: ``"shapes"`` (the held-out split the demo uses), ``"none"``, or a
    folder of images (with same-stem ``.txt`` captions for the cross-entropy and default prompts)."""

    checkpoint: Path
    prompts: tuple[str, ...] = ()
    max_prompts: int = 32
    images_per_prompt: int = 4
    candidates_per_prompt: int | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    clip_model: str | None = None
    clip_weights: Path | None = None
    inception_weights: Path | None = None
    lpips_trunk_weights: Path | None = None
    lpips_linear_weights: Path | None = None
    reference: str = "shapes"
    reference_samples_per_spec: int = 4
    shapes_seed: int = 0
    holdout_fraction: float = 0.15
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    image_scale: int = 4
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.images_per_prompt < 1 or self.max_prompts < 1:
            raise ConfigError(
                f"images_per_prompt and max_prompts must be >= 1, got {self.images_per_prompt} and {self.max_prompts}"
            )
        candidates = self.candidates_per_prompt
        if candidates is not None and candidates < self.images_per_prompt:
            raise ConfigError(
                f"candidates_per_prompt ({candidates}) must be >= images_per_prompt ({self.images_per_prompt})"
            )
        if candidates is not None and candidates > self.images_per_prompt and self.clip_model is None:
            raise ConfigError(
                f"keeping {self.images_per_prompt} of {candidates} candidates needs a CLIP model to rank them "
                "(--clip-model DIR or an open_clip architecture with --clip-weights FILE)"
            )
        if self.image_scale < 1:
            raise ConfigError(f"image_scale must be >= 1, got {self.image_scale}")


@dataclass
class Models:
    """Optional pre-built metric models; any left ``None`` is loaded from the config's weight paths (if set)."""

    clip: ClipScorer | None = None
    features: FeatureExtractor | None = None
    lpips: Lpips | None = None


def _reference(config: EvalConfig, image_size: int) -> ImageTextPairs | None:
    if config.reference == "none":
        return None
    if config.reference == "shapes":
        return shapes_pairs(
            image_size, "heldout", config.reference_samples_per_spec, config.shapes_seed, config.holdout_fraction
        )
    return load_image_folder(config.reference, image_size, with_captions=False)


def _captioned_folder(config: EvalConfig, image_size: int) -> ImageTextPairs | None:
    """The reference folder's captioned pairs, or ``None`` when the folder has no captions."""
    try:
        return load_image_folder(config.reference, image_size, with_captions=True)
    except DataError:
        return None


def _prompts(config: EvalConfig, captioned: ImageTextPairs | None) -> list[str]:
    prompts = list(config.prompts)
    if not prompts and captioned is not None:
        prompts = list(dict.fromkeys(captioned.captions))  # distinct, in order
    if not prompts:
        raise DataError("expected prompts (--prompt / --prompts-file) or a reference set with captions, got neither")
    return prompts[: config.max_prompts]


def _shapes_specs(prompts: Sequence[str]) -> list[ShapeSpec] | None:
    try:
        return [parse_caption(prompt) for prompt in prompts]
    except ConfigError:
        return None


def _held_out_tokens(bundle: Bundle, pairs: ImageTextPairs, batch_size: int) -> TokenData:
    text_ids = bundle.text_tokenizer.encode(list(pairs.captions), bundle.model.config.text_seq_len, truncate=True)
    device = device_of(bundle.image_tokenizer)
    image_ids = torch.cat(
        [
            bundle.image_tokenizer.encode(pairs.images[start : start + batch_size].to(device)).cpu()
            for start in range(0, len(pairs), batch_size)
        ]
    )
    return TokenData(text_ids, image_ids, pairs.captions)


def _note(generation: Generation, indices: Sequence[int]) -> str:
    parts = []
    for i in indices:
        reading = check_image(generation.images[i])
        text = f"{reading.size or '?'} {reading.colour or '?'} {reading.shape or '?'} @ {reading.position or '?'}"
        if generation.scores is not None:
            text += f" (clip {generation.scores[i]:.3f})"
        parts.append(text)
    return "; ".join(parts)


def run_eval(config: EvalConfig, output: str | Path, models: Models | None = None) -> dict[str, Any]:
    """Run the evaluation into ``output``; returns the metrics also written to ``output/metrics.json``."""
    started = time.perf_counter()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    models = models or Models()
    timings: dict[str, float] = {}
    bundle = load_bundle(config.checkpoint)
    bundle.model.to(config.device)
    if isinstance(bundle.image_tokenizer, torch.nn.Module):
        bundle.image_tokenizer.to(config.device)
    image_size = bundle.image_tokenizer.image_size
    # Load every metric model first, so a missing weights file fails before minutes of sampling, not after.
    scorer = models.clip
    if scorer is None and config.clip_model is not None:
        scorer = load_clip(config.clip_model, config.clip_weights, config.device)
    lpips = models.lpips
    if lpips is None and config.lpips_trunk_weights is not None:
        lpips = load_lpips(config.lpips_trunk_weights, config.lpips_linear_weights, config.device)
    features = models.features
    if features is None and config.inception_weights is not None:
        features = load_fid_inception(config.inception_weights, config.device)

    reference = _reference(config, image_size)
    captioned = reference if config.reference == "shapes" else None
    if config.reference not in ("shapes", "none"):
        captioned = _captioned_folder(config, image_size)
    prompts = _prompts(config, captioned)

    candidates = config.candidates_per_prompt or config.images_per_prompt
    mark = time.perf_counter()
    drawn = generate(bundle, prompts, candidates, config.sampling)
    timings["generation_s"] = time.perf_counter() - mark

    metrics: dict[str, Any] = {
        "checkpoint": str(config.checkpoint),
        "sampling": asdict(config.sampling),
        "counts": {"prompts": len(prompts), "candidates_per_prompt": candidates, "kept_per_prompt": 0},
    }
    kept = drawn
    if scorer is not None:
        mark = time.perf_counter()
        ranked = rerank(drawn, scorer.cosine, config.images_per_prompt)
        kept = ranked.kept
        metrics["clip"] = {
            "model": scorer.name,
            "clip_score": float((100 * ranked.scores[list(ranked.kept_indices)].clamp_min(0)).mean()),
            "clip_score_all_candidates": float((100 * ranked.scores.clamp_min(0)).mean()),
            "reranked": candidates > config.images_per_prompt,
        }
        timings["clip_s"] = time.perf_counter() - mark
    metrics["counts"]["kept_per_prompt"] = config.images_per_prompt

    specs = _shapes_specs(kept.prompts)
    if specs is not None:
        metrics["shapes_checker"] = {"generated": score(kept.images, specs), "chance": chance_levels()}
        if candidates > config.images_per_prompt:
            all_specs = _shapes_specs(drawn.prompts) or []
            metrics["shapes_checker"]["all_candidates"] = score(drawn.images, all_specs)

    if reference is not None:
        mark = time.perf_counter()
        images = reference.images.to(config.device)
        metrics["vae"] = reconstruction_metrics(bundle.image_tokenizer, images, config.sampling.batch_size, lpips)
        if captioned is not None:
            held_out = _held_out_tokens(bundle, captioned, config.sampling.batch_size)
            held_out = TokenData(
                held_out.text_ids.to(config.device), held_out.image_ids.to(config.device), held_out.captions
            )
            metrics["dalle_heldout"] = language_model_metrics(bundle.model, held_out, config.sampling.batch_size)
        timings["reference_metrics_s"] = time.perf_counter() - mark
        if features is not None:
            mark = time.perf_counter()
            metrics["fid_kid"] = distribution_metrics(
                features,
                reference.images,
                kept.images,
                kid_subset_size=config.kid_subset_size,
                kid_subsets=config.kid_subsets,
            )
            timings["fid_kid_s"] = time.perf_counter() - mark
    if specs is not None and reference is not None and config.reference == "shapes":
        metrics["shapes_checker"]["reference_images"] = score(
            reference.images, [parse_caption(c) for c in reference.captions]
        )

    paths = write_generation(kept, output, scale=config.image_scale, metadata={"checkpoint": str(config.checkpoint)})
    timings["total_s"] = time.perf_counter() - started
    metrics["timings_s"] = {key: round(value, 2) for key, value in timings.items()}
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    entries = []
    for p_index, prompt in enumerate(prompts):
        indices = [i for i, p in enumerate(kept.prompt_indices) if p == p_index]
        note = (
            _note(kept, indices)
            if specs is not None
            else ("; ".join(f"clip {kept.scores[i]:.3f}" for i in indices) if kept.scores is not None else "")
        )
        entries.append((prompt, [paths[i] for i in indices], note))
    notes = [
        f"checkpoint: {config.checkpoint}",
        f"{len(prompts)} prompts; {config.images_per_prompt} of {candidates} images kept per prompt"
        + (f", ranked by CLIP ({metrics['clip']['model']})" if "clip" in metrics else ""),
        "sampling: " + json.dumps(to_dict(config.sampling)),
    ]
    header = "checker reading" if specs is not None else "score"
    write_report(output, "dalle eval", entries, metrics, grid=output / "grid.png", notes=notes, note_header=header)
    return metrics
