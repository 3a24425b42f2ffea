"""The end-to-end demo: shapes data -> DiscreteVAE -> DALLE -> images for held-out captions -> checker -> report."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from dalle_core.config import from_dict, to_dict, write_config_file
from dalle_core.images import save_image_grid
from dalle_eval.metrics import language_model_metrics, reconstruction_metrics
from dalle_eval.pipeline import SamplingOptions, generate, write_generation
from dalle_eval.report import write_report
from dalle_tokenizers import SimpleTokenizer
from dalle_train.bundle import Bundle, save_bundle
from dalle_train.config import DALLETrainConfig, LoopConfig, OptimizerConfig, VAETrainConfig
from dalle_train.dalle_trainer import train_dalle
from dalle_train.datasets.shapes import ShapesDataset, chance_levels, check_image, score, split_specs
from dalle_train.progress import console
from dalle_train.tokenized import pretokenize
from dalle_train.vae_trainer import train_vae
from dalle_vae import DiscreteVAEConfig


@dataclass(frozen=True)
class DemoConfig:
    image_size: int = 32
    samples_per_spec: int = 24
    holdout_fraction: float = 0.15
    images_per_prompt: int = 4
    max_prompts: int = 32
    sample_top_k: int | None = 8
    seed: int = 0
    vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    dalle: DALLETrainConfig = field(default_factory=DALLETrainConfig)


def preset(name: Literal["fast", "better"]) -> DemoConfig:
    """``fast`` fits in under 15 minutes on 2 CPU cores; ``better`` trains about four times longer."""
    vae = VAETrainConfig(
        vae=DiscreteVAEConfig(
            image_size=32, num_layers=2, num_tokens=128, codebook_dim=64, hidden_dim=64, num_resnet_blocks=1
        ),
        loop=LoopConfig(steps=1200, batch_size=32, sample_every=300, checkpoint_every=600),
        optimizer=OptimizerConfig(lr=2e-3, min_lr_ratio=0.05),
    )
    dalle = DALLETrainConfig(
        model={"dim": 128, "depth": 4, "heads": 4, "dim_head": 32, "loss_img_weight": 7.0},
        text_seq_len=48,
        loop=LoopConfig(steps=1500, batch_size=32, sample_every=500, checkpoint_every=500),
        optimizer=OptimizerConfig(lr=1e-3, warmup_steps=100, min_lr_ratio=0.1),
        sample_top_k=8,
    )
    config = DemoConfig(vae=vae, dalle=dalle)
    if name == "better":
        config = replace(
            config,
            samples_per_spec=48,
            vae=replace(vae, loop=replace(vae.loop, steps=4000)),
            dalle=replace(dalle, model={**dalle.model, "dim": 256}, loop=replace(dalle.loop, steps=6000)),
        )
    return config


def demo_config(name: Literal["fast", "better"], overrides: dict[str, Any]) -> DemoConfig:
    """A preset with ``a.b=value`` overrides applied and validated."""
    from dalle_core.config import apply_overrides

    return from_dict(DemoConfig, apply_overrides(to_dict(preset(name)), [f"{k}={v}" for k, v in overrides.items()]))


def run_demo(config: DemoConfig, output: Path) -> dict[str, Any]:
    """Run the whole demo into ``output``; returns the metrics written to ``output/metrics.json``."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    write_config_file(config, output / "demo_config.yaml")
    torch.manual_seed(config.seed)
    train_specs, heldout_specs = split_specs(config.seed, config.holdout_fraction)
    console.print(
        f"[bold]shapes[/bold]: {len(train_specs)} training combinations, {len(heldout_specs)} held out "
        f"(never seen in training), {config.samples_per_spec} images each"
    )
    train_set = ShapesDataset(train_specs, config.samples_per_spec, config.image_size, seed=config.seed)
    heldout_set = ShapesDataset(heldout_specs, 4, config.image_size, seed=config.seed + 1)

    timings: dict[str, float] = {}
    mark = time.perf_counter()
    vae = train_vae(config.vae, train_set, output / "vae", resume=True)
    timings["vae_training_s"] = time.perf_counter() - mark

    tokenizer = SimpleTokenizer()
    mark = time.perf_counter()
    train_tokens = pretokenize(train_set, tokenizer, vae, config.dalle.text_seq_len)
    heldout_tokens = pretokenize(heldout_set, tokenizer, vae, config.dalle.text_seq_len, description="encode held-out")
    heldout_images = torch.stack([heldout_set[i][0] for i in range(len(heldout_set))])
    timings["tokenize_s"] = time.perf_counter() - mark

    prompts = [spec.caption for spec in heldout_specs[: config.max_prompts]]
    mark = time.perf_counter()
    model = train_dalle(
        config.dalle,
        train_tokens,
        tokenizer,
        vae,
        output / "dalle",
        sample_prompts=prompts[:8],
        validation=heldout_tokens,
        resume=True,
    )
    timings["dalle_training_s"] = time.perf_counter() - mark
    bundle = Bundle(model, tokenizer, vae)
    save_bundle(output / "model", model, tokenizer, vae, training_config=to_dict(config))

    mark = time.perf_counter()
    options = SamplingOptions(temperature=1.0, top_k=config.sample_top_k, seed=config.seed, batch_size=32)
    generation = generate(bundle, prompts, config.images_per_prompt, options)
    timings["generation_s"] = time.perf_counter() - mark
    paths = write_generation(generation, output, scale=4)

    specs = [spec for spec in heldout_specs[: config.max_prompts] for _ in range(config.images_per_prompt)]
    shapes_scores = score(generation.images, specs)
    reference = score(heldout_images, [s for s in heldout_specs for _ in range(4)])
    reconstructions = vae.decode(vae.encode(heldout_images))
    save_image_grid(
        torch.cat([heldout_images[:16], reconstructions[:16]]), output / "vae_reconstructions.png", nrow=16, scale=4
    )

    metrics = {
        "shapes_checker": {
            "generated_heldout_captions": shapes_scores,
            "chance": chance_levels(),
            "vae_reconstructions": score(reconstructions, [s for s in heldout_specs for _ in range(4)]),
            "real_images": reference,
        },
        "vae": reconstruction_metrics(vae, heldout_images),
        "dalle_heldout": language_model_metrics(model, heldout_tokens),
        "timings_s": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - started, 1)},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "counts": {
            "train_images": len(train_set),
            "heldout_prompts": len(prompts),
            "images_per_prompt": config.images_per_prompt,
        },
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    entries = []
    for p_index, prompt in enumerate(prompts):
        chunk = slice(p_index * config.images_per_prompt, (p_index + 1) * config.images_per_prompt)
        readings = [check_image(image) for image in generation.images[chunk]]
        note = "; ".join(f"{r.size or '?'} {r.colour or '?'} {r.shape or '?'} @ {r.position or '?'}" for r in readings)
        entries.append((prompt, paths[chunk], note))
    write_report(output, "dalle demo: shapes", entries, metrics, grid=output / "grid.png")
    return metrics
