"""`dalle tokenizer ...`: text tokenizer commands. Mounted on the root app as `tokenizer`; heavy imports stay inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

BPE_KINDS = ("hf-bpe", "yttm")
# The tokenizer kind that reads what each trainer writes.
KIND_OF_FILE = {"hf-bpe": "hf", "yttm": "yttm"}

app = typer.Typer(help="Text tokenizers: train a BPE on your captions.", no_args_is_help=True)


@app.callback()
def tokenizer() -> None:
    """Text tokenizers: train a BPE on your captions."""


@app.command()
def train(
    corpus: Annotated[list[Path], typer.Argument(help="Text files with one caption per line.")],
    output: Annotated[Path, typer.Option(help="File to write: a tokenizer.json (hf-bpe) or a .model (yttm).")],
    vocab_size: Annotated[int, typer.Option(help="Ids to learn at most; a small corpus may give fewer.")],
    kind: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(BPE_KINDS),
            help="hf-bpe: byte-level BPE, any script, needs dalle-tokenizers[hf]; "
            "yttm: YouTokenToMe as DALLE-pytorch's --bpe_path, needs dalle-tokenizers[yttm].",
        ),
    ] = "hf-bpe",
) -> None:
    """Train a BPE on CORPUS and write it to OUTPUT; prints the exact vocabulary size the transformer must use."""
    from dalle_tokenizers import build_text_tokenizer
    from dalle_tokenizers.training import train_bpe

    path = train_bpe(kind, corpus, vocab_size, output)  # type: ignore[arg-type]  # click checked the choice
    trained = build_text_tokenizer(KIND_OF_FILE[kind], path)
    typer.echo(
        f"wrote {path}: {trained.vocab_size} ids (asked for at most {vocab_size}), padding id {trained.pad_id}; "
        f"text tokenizer kind {KIND_OF_FILE[kind]!r}"
    )
