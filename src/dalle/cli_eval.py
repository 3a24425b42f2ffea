"""`dalle eval` (measure a checkpoint, write a report) and `dalle clip train` (a small CLIP for reranking).

Mount with ``app.command("eval")(cli_eval.eval_command)`` and ``app.add_typer(cli_eval.clip_app, name="clip")``
(or :func:`register`). Heavy imports happen inside the commands so ``dalle --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

clip_app = typer.Typer(help="Train a small CLIP on your own image/caption pairs (for reranking).", no_args_is_help=True)


def _read_prompts(prompt: list[str], prompts_file: Path | None) -> tuple[str, ...]:
    from dalle_core.errors import DataError

    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise DataError(f"prompts file not found: {prompts_file}")
        texts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return tuple(texts)


def eval_command(
    checkpoint: Annotated[Path, typer.Option(help="A model directory written by training or the demo.")],
    output: Annotated[Path, typer.Option(help="Report directory: index.html, metrics.json, images.")] = Path(
        "eval-report"
    ),
    prompt: Annotated[list[str], typer.Option(help="A caption (repeatable). Default: the reference's captions.")] = [],  # noqa: B006
    prompts_file: Annotated[Path | None, typer.Option(help="A text file with one caption per line.")] = None,
    max_prompts: Annotated[int, typer.Option(help="Use at most this many prompts.")] = 32,
    images_per_prompt: Annotated[int, typer.Option(help="Images kept per prompt (K).")] = 4,
    candidates: Annotated[
        int | None, typer.Option(help="Images drawn per prompt (N >= K); the best K by CLIP are kept.")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely image tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    seed_scope: Annotated[
        str, typer.Option(help="'image': each image its own seed (batch-size independent); 'batch': faster.")
    ] = "image",
    batch_size: Annotated[int, typer.Option(help="Rows per transformer / decoder call.")] = 16,
    reference: Annotated[
        str, typer.Option(help="'shapes' (held-out split), 'none', or a folder of images (+ same-stem .txt).")
    ] = "shapes",
    clip_model: Annotated[
        str | None, typer.Option(help="A directory from `dalle clip train`, or an open_clip architecture name.")
    ] = None,
    clip_weights: Annotated[Path | None, typer.Option(help="Local weights file for an architecture name.")] = None,
    inception_weights: Annotated[
        Path | None, typer.Option(help="Local FID Inception file (weights-inception-2015-12-05-6726825d.pth).")
    ] = None,
    lpips_trunk_weights: Annotated[
        Path | None, typer.Option(help="Local torchvision AlexNet file (alexnet-owt-7be5be79.pth) for LPIPS.")
    ] = None,
    lpips_linear_weights: Annotated[
        Path | None, typer.Option(help="LPIPS v0.1 alex.pth (default: the copy inside an installed lpips).")
    ] = None,
    device: Annotated[str, typer.Option(help="torch device for the models, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Draw images for prompts (optionally reranked by CLIP), measure them, write OUTPUT/index.html and metrics.json."""
    from dalle_core.config import from_dict
    from dalle_eval.evaluate import EvalConfig, run_eval

    settings = {
        "checkpoint": str(checkpoint),
        "prompts": list(_read_prompts(prompt, prompts_file)),
        "max_prompts": max_prompts,
        "images_per_prompt": images_per_prompt,
        "candidates_per_prompt": candidates,
        "sampling": {
            "temperature": temperature,
            "top_k": top_k,
            "seed": seed,
            "batch_size": batch_size,
            "seed_scope": seed_scope,
        },
        "clip_model": clip_model,
        "clip_weights": None if clip_weights is None else str(clip_weights),
        "inception_weights": None if inception_weights is None else str(inception_weights),
        "lpips_trunk_weights": None if lpips_trunk_weights is None else str(lpips_trunk_weights),
        "lpips_linear_weights": None if lpips_linear_weights is None else str(lpips_linear_weights),
        "reference": reference,
        "device": device,
    }
    metrics = run_eval(from_dict(EvalConfig, settings), output)
    summary = [f"{metrics['counts']['prompts']} prompts"]
    if "shapes_checker" in metrics:
        shapes = metrics["shapes_checker"]["generated"]
        summary.append("checker " + ", ".join(f"{k} {shapes[k]:.0%}" for k in ("colour", "shape", "size", "position")))
    if "clip" in metrics:
        summary.append(f"CLIP score {metrics['clip']['clip_score']:.1f}")
    if "fid_kid" in metrics:
        summary.append(f"FID {metrics['fid_kid']['fid']:.2f}, KID {metrics['fid_kid']['kid']:.4f}")
    typer.echo("; ".join(summary))
    typer.echo(f"report: {output / 'index.html'}")


@clip_app.command("train")
def clip_train(
    output: Annotated[Path, typer.Option(help="Directory for the CLIP (open_clip local-dir format).")],
    dataset: Annotated[
        str, typer.Option(help="'shapes' (its training split) or a folder of images with same-stem .txt captions.")
    ] = "shapes",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Pairs per step (each caption at most once).")] = 64,
    image_size: Annotated[int, typer.Option(help="Image side the CLIP sees.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and batches.")] = 0,
    samples_per_spec: Annotated[int, typer.Option(help="shapes only: renderings per caption.")] = 8,
    shapes_seed: Annotated[
        int, typer.Option(help="shapes only: the split seed (0, as in the demo, keeps its held-out captions unseen).")
    ] = 0,
    set_: Annotated[
        list[str], typer.Option("--set", help="ClipTrainConfig override KEY=VALUE, e.g. width=128 (repeatable).")
    ] = [],  # noqa: B006
) -> None:
    """Train a small CLIP (open_clip's model and loss) for `dalle eval --clip-model OUTPUT`."""
    from dalle_core.config import apply_overrides, from_dict
    from dalle_eval.clip_train import ClipTrainConfig, train_clip
    from dalle_eval.image_folder import load_image_folder, shapes_pairs

    base = {"steps": steps, "batch_size": batch_size, "image_size": image_size, "seed": seed}
    config = from_dict(ClipTrainConfig, apply_overrides(base, set_))
    if dataset == "shapes":
        data = shapes_pairs(config.image_size, "train", samples_per_spec, seed=shapes_seed)
    else:
        data = load_image_folder(dataset, config.image_size, with_captions=True)
    typer.echo(f"training on {len(data)} pairs ({len(set(data.captions))} distinct captions)")
    train_clip(config, data, output, log=typer.echo)
    typer.echo(f"saved {output} (use: dalle eval --clip-model {output})")


def register(app: typer.Typer) -> None:
    """Mount ``dalle eval`` and ``dalle clip train`` on the root app."""
    app.command("eval")(eval_command)
    app.add_typer(clip_app, name="clip")
