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
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 4,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k most likely image tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed: the same seed gives the same images.")] = 0,
    output: Annotated[Path, typer.Option(help="Directory for images, grid.png and generations.json.")] = Path(
        "generations"
    ),
) -> None:
    """Draw images for captions from a trained checkpoint."""
    from dalle_core.errors import DataError
    from dalle_eval.pipeline import SamplingOptions, generate, write_generation
    from dalle_train.bundle import load_bundle

    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise DataError(f"prompts file not found: {prompts_file}")
        texts += [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise DataError("expected at least one --prompt or a --prompts-file, got none")
    bundle = load_bundle(checkpoint)
    options = SamplingOptions(temperature=temperature, top_k=top_k, seed=seed)
    result = generate(bundle, texts, num_images, options)
    paths = write_generation(result, output)
    typer.echo(f"wrote {len(paths)} images and {output / 'grid.png'}")


def _mount_subcommands() -> None:
    from dalle import cli_checkpoint, cli_eval, cli_tokenizer
    from dalle.cli_train import train as train_command

    app.command("train")(train_command)
    cli_eval.register(app)
    app.add_typer(cli_checkpoint.app, name="checkpoint")
    app.add_typer(cli_tokenizer.app, name="tokenizer")


_mount_subcommands()


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    from dalle_core.errors import DalleError

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
