"""The `dalle` command: a thin Typer root composing sub-commands; heavy imports happen inside each command."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import click
import typer

app = typer.Typer(
    name="dalle",
    help="Train and sample text-to-image models built from discrete image tokens and a transformer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _parse_sets(values: list[str]) -> dict[str, str]:
    from dalle_core.config import parse_override

    parsed = {}
    for value in values:
        keys, _ = parse_override(value)
        parsed[".".join(keys)] = value.partition("=")[2]
    return parsed


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Directory for the report, images, metrics and model.")] = Path(
        "demo-output"
    ),
    preset: Annotated[str, typer.Option(help="'fast' (< 15 min on 2 CPU cores) or 'better' (about 4x longer).")] = (
        "fast"
    ),
    vae_steps: Annotated[int | None, typer.Option(help="Override the VAE's training steps.")] = None,
    dalle_steps: Annotated[int | None, typer.Option(help="Override the transformer's training steps.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data, training and sampling.")] = 0,
    set_: Annotated[
        list[str], typer.Option("--set", help="Config override KEY=VALUE, e.g. dalle.model.depth=6 (repeatable).")
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
    fresh: Annotated[bool, typer.Option(help="Ignore checkpoints left in OUTPUT by an earlier run.")] = False,
) -> None:
    """Generate shapes data, train a VAE and a transformer, draw held-out captions, write OUTPUT/index.html."""
    import shutil

    from dalle.demo import demo_config, run_demo
    from dalle_core.errors import ConfigError

    if preset not in ("fast", "better"):
        raise ConfigError(f"--preset must be 'fast' or 'better', got {preset!r}")
    overrides = _parse_sets(set_)
    overrides["seed"] = str(seed)
    if vae_steps is not None:
        overrides["vae.loop.steps"] = str(vae_steps)
    if dalle_steps is not None:
        overrides["dalle.loop.steps"] = str(dalle_steps)
    config = demo_config(preset, overrides)  # type: ignore[arg-type]
    if fresh and output.exists():
        shutil.rmtree(output)
    metrics = run_demo(config, output)
    shapes = metrics["shapes_checker"]["generated_heldout_captions"]
    chance = metrics["shapes_checker"]["chance"]
    typer.echo(
        "held-out captions, checker accuracy (chance): "
        + ", ".join(f"{key} {shapes[key]:.0%} ({chance[key]:.0%})" for key in ("colour", "shape", "size", "position"))
    )
    typer.echo(f"report: {output / 'index.html'}  ({metrics['timings_s']['total']:.0f} s)")


@app.command()
def generate(
    checkpoint: Annotated[Path, typer.Option(help="A model directory written by training or the demo.")],
    prompt: Annotated[list[str], typer.Option(help="A caption (repeatable).")] = [],  # noqa: B006
    prompts_file: Annotated[Path | None, typer.Option(help="A text file with one caption per line.")] = None,
    num_images: Annotated[int, typer.Option(help="Images kept per prompt.")] = 4,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely image tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Sample among the most likely tokens holding this much probability.")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    cond_scale: Annotated[
        float, typer.Option(help="Classifier-free guidance scale: 1 is none, larger follows the caption more.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    seed_scope: Annotated[
        str, typer.Option(help="'image': each image its own seed (batch-size independent); 'batch': one generator.")
    ] = "image",
    batch_size: Annotated[int, typer.Option(help="Rows per transformer / decoder call.")] = 16,
    rerank: Annotated[
        str | None,
        typer.Option(help="CLIP for reranking: a `dalle clip train` directory, or an open_clip architecture name."),
    ] = None,
    clip_weights: Annotated[Path | None, typer.Option(help="Local weights file for an architecture name.")] = None,
    candidates: Annotated[
        int | None, typer.Option(help="With --rerank: images drawn per prompt; the best --num-images are kept.")
    ] = None,
    priming_image: Annotated[
        Path | None, typer.Option(help="Start every image from this picture's first image tokens.")
    ] = None,
    priming_tokens: Annotated[
        int | None, typer.Option(help="Image tokens of --priming-image kept (default: 0.4375 of them, 14 of 32 rows).")
    ] = None,
    progress: Annotated[
        bool,
        typer.Option(
            help="Write partial images to OUTPUT/progress/IMAGE-step-STEP.png while sampling (IMAGE counts the drawn "
            "candidates, prompt by prompt; tokens not yet sampled are painted grey)."
        ),
    ] = False,
    progress_every: Annotated[int, typer.Option(help="With --progress: sampled tokens between previews.")] = 16,
    device: Annotated[str, typer.Option(help="torch device for the models, e.g. cpu or cuda.")] = "cpu",
    compile_decoding: Annotated[
        bool,
        typer.Option(
            help="torch.compile the transformer's decoding step (decoder-only models): a compile of tens of seconds "
            "first, then fused steps; on a CPU with AVX-512 the eager steps are as fast or faster (see "
            "docs/benchmarks.md)."
        ),
    ] = False,
    weight_copies: Annotated[
        bool,
        typer.Option(
            "--weight-copies/--no-weight-copies",
            help="On a CPU, decode each batch through copies of the transformer's projection weights in the layout "
            "its few-row products are fastest with: a second copy of those weights in memory while a batch is drawn. "
            "--no-weight-copies reads them as stored (the same images, slower, less memory).",
        ),
    ] = True,
    output: Annotated[Path, typer.Option(help="Directory for images, grid.png and generations.json.")] = Path(
        "generations"
    ),
) -> None:
    """Draw images for captions from a trained checkpoint (optionally guided, primed, reranked by CLIP)."""
    from dalle_core.errors import ConfigError, DataError

    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise DataError(f"prompts file not found: {prompts_file}")
        texts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DataError("expected at least one --prompt or a --prompts-file, got none")
    if num_images < 1:
        raise ConfigError(f"--num-images must be >= 1, got {num_images}")
    drawn_per_prompt = num_images if candidates is None else candidates
    if drawn_per_prompt < num_images:
        raise ConfigError(f"--candidates ({candidates}) must be >= --num-images ({num_images})")
    if drawn_per_prompt > num_images and rerank is None:
        raise ConfigError(f"keeping {num_images} of {candidates} candidates needs --rerank CLIP to rank them")
    if clip_weights is not None and rerank is None:
        raise ConfigError("--clip-weights is the weights of a --rerank architecture; give --rerank too")
    if priming_tokens is not None and priming_image is None:
        raise ConfigError("--priming-tokens counts tokens of a --priming-image; give --priming-image too")
    if priming_image is not None and not priming_image.is_file():
        raise DataError(f"priming image not found: {priming_image}")

    from dalle_eval.pipeline import ProgressPreviews, SamplingOptions, generate, load_priming_image, write_generation
    from dalle_train.bundle import load_bundle, resolve_bundle_dir

    options = SamplingOptions(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        cond_scale=cond_scale,
        seed=seed,
        batch_size=batch_size,
        seed_scope=seed_scope,  # type: ignore[arg-type]  # checked by SamplingOptions
    )
    directory = resolve_bundle_dir(checkpoint)
    bundle = load_bundle(directory)
    bundle.model.to(device)
    bundle.model.decoding_weight_copies = weight_copies
    if compile_decoding:
        architecture = bundle.model.config.architecture
        if architecture != "decoder_only":
            raise ConfigError(f"--compile-decoding is for decoder-only models; this checkpoint's is {architecture}")
        bundle.model.compile_decoding = True
        typer.echo("compiling the decoding step at the first batch (tens of seconds, once per batch size)", err=True)
    _note_decoding_kernels(device)
    if hasattr(bundle.image_tokenizer, "to"):
        bundle.image_tokenizer.to(device)
    scorer = None
    if rerank is not None:  # loaded before sampling, so a bad CLIP fails fast
        from dalle_eval.clip import load_clip

        scorer = load_clip(rerank, clip_weights, device)
    priming = None if priming_image is None else load_priming_image(bundle, priming_image, priming_tokens)
    previews = ProgressPreviews(bundle, output / "progress") if progress else None
    result = generate(
        bundle, texts, drawn_per_prompt, options, priming=priming, progress=previews, progress_every=progress_every
    )
    metadata: dict[str, object] = {"checkpoint": str(directory), "candidates_per_prompt": drawn_per_prompt}
    if scorer is not None:
        from dalle_eval.rerank import rerank as keep_best

        result = keep_best(result, scorer.cosine, num_images).kept
        metadata["rerank"] = {"clip": rerank, "clip_weights": None if clip_weights is None else str(clip_weights)}
    paths = write_generation(result, output, metadata=metadata)
    summary = f"wrote {len(paths)} images and {output / 'grid.png'}"
    if scorer is not None:
        summary += f" (best {num_images} of {drawn_per_prompt} per prompt by CLIP)"
    if previews is not None:
        summary += f"; {len(previews.paths)} previews in {output / 'progress'}"
    typer.echo(summary)


def _note_decoding_kernels(device: str) -> None:
    from dalle_transformer import native

    note = native.fallback_note(device, "decoding")
    if note is not None:
        typer.echo(note, err=True)


def _mount_subcommands() -> None:
    """Mount the sub-commands (each module imports only typer at import time) in the order `dalle --help` lists."""
    from dalle import cli_checkpoint, cli_eval, cli_tokenizer, cli_vae
    from dalle.cli_train import train as train_command

    app.command("train")(train_command)
    app.command("eval")(cli_eval.eval_command)
    app.add_typer(cli_vae.app, name="vae")
    app.add_typer(cli_tokenizer.app, name="tokenizer")
    app.add_typer(cli_eval.clip_app, name="clip")
    app.add_typer(cli_checkpoint.app, name="checkpoint")


_mount_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    from dalle_core.allocator import keep_large_buffers
    from dalle_core.errors import DalleError

    keep_large_buffers()

    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="dalle", standalone_mode=False)
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except click.exceptions.NoArgsIsHelpError:
        return 0  # the help text has been printed
    except click.ClickException as error:
        print(f"error: {error.format_message()} (see `dalle --help`)", file=sys.stderr)
        return 2
    except DalleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
