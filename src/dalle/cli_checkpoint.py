"""`dalle checkpoint ...`: look inside checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="Inspect, import and export checkpoints.", no_args_is_help=True)


@app.command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A model bundle or training checkpoint directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Print what a checkpoint holds: transformer config, parameter count, tokenizers, training step."""
    from dalle_core.checkpoint import read_json
    from dalle_train.bundle import load_bundle, resolve_bundle_dir

    directory = resolve_bundle_dir(checkpoint)
    bundle = load_bundle(directory)
    config = bundle.model.config
    summary: dict[str, Any] = {
        "directory": str(directory),
        "parameters": sum(p.numel() for p in bundle.model.parameters()),
        "transformer": {k: v for k, v in vars(config).items() if not k.startswith("_")},
        "text_tokenizer": read_json(directory / "text_tokenizer" / "spec.json"),
        "image_tokenizer": {
            **read_json(directory / "image_tokenizer" / "spec.json"),
            "num_tokens": bundle.image_tokenizer.num_tokens,
            "image_size": bundle.image_tokenizer.image_size,
            "fmap_size": bundle.image_tokenizer.fmap_size,
        },
    }
    state = directory.parent / "training_state.pt"
    if directory.name == "model" and state.is_file():
        import torch

        summary["training_step"] = int(torch.load(state, map_location="cpu", weights_only=True)["step"])
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    typer.echo(f"checkpoint      {summary['directory']}")
    typer.echo(f"parameters      {summary['parameters']:,}")
    if "training_step" in summary:
        typer.echo(f"training step   {summary['training_step']}")
    typer.echo(f"text tokenizer  {summary['text_tokenizer']}")
    typer.echo(f"image tokenizer {summary['image_tokenizer']}")
    for key, value in summary["transformer"].items():
        typer.echo(f"  {key:<22}{value}")
