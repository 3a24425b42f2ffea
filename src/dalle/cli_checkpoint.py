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


@app.command("import")
def import_checkpoint(
    dalle_pt: Annotated[Path, typer.Argument(help="A DALLE-pytorch dalle.pt (train_dalle.py's output).")],
    output: Annotated[Path, typer.Option(help="Bundle directory to write (replaced if it exists).")],
    bpe_path: Annotated[
        Path | None,
        typer.Option(help="The --bpe_path file it was trained with: a Hugging Face .json or a YouTokenToMe .model."),
    ] = None,
    clip_vocab: Annotated[
        Path | None,
        typer.Option(
            help="Without --bpe-path: CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt[.gz]); default: the one in "
            "open-clip-torch when installed."
        ),
    ] = None,
    openai_dir: Annotated[
        Path | None,
        typer.Option(
            help="OpenAI dVAE models: a directory with encoder.pkl and decoder.pkl (default: the saved copy)."
        ),
    ] = None,
    taming_checkpoint: Annotated[
        Path | None, typer.Option(help="VQGAN models: the taming .ckpt (default: the copy saved in the dalle.pt).")
    ] = None,
    taming_config: Annotated[
        Path | None,
        typer.Option(help="VQGAN models: the taming .yaml (default: DALLE-pytorch's cached vqgan.1024.config.yml)."),
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow torch.load to run code from the files when their plain-data reading fails. Only for files "
            "you trust."
        ),
    ] = False,
) -> None:
    """Convert a DALLE-pytorch dalle.pt (transformer, its VAE, its tokenizer) into a bundle for `dalle generate`."""
    from dalle.checkpoint_import import import_dalle_pytorch

    written = import_dalle_pytorch(
        dalle_pt,
        output,
        bpe_path=bpe_path,
        clip_vocab=clip_vocab,
        openai_dir=openai_dir,
        taming_checkpoint=taming_checkpoint,
        taming_config=taming_config,
        trust_pickle=trust_pickle,
    )
    typer.echo(f"imported {dalle_pt} into {written} (dalle generate --checkpoint {written} --prompt ...)")
