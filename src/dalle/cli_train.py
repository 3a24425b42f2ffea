"""``dalle train``: run a training from a config file or a named recipe (mounted by :mod:`dalle.cli`).

Heavy imports happen inside the command, so ``dalle --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train(
    config: Annotated[str, typer.Option(help="A YAML/JSON config file, or a recipe name: tiny-cpu, cub200, coco.")],
    output: Annotated[Path, typer.Option(help="Run directory: checkpoints, samples, metrics, the final model/.")],
    set_: Annotated[
        list[str],
        typer.Option("--set", help="Config override KEY=VALUE, e.g. dalle.model.depth=8 (repeatable)."),
    ] = [],  # noqa: B006 - typer reads the default, it is never mutated
    resume: Annotated[
        bool, typer.Option("--resume/--fresh", help="Continue from the newest checkpoints, or delete OUTPUT first.")
    ] = True,
    dry_run: Annotated[
        bool, typer.Option(help="Check config, data and tokenizers, print the resolved config, and stop.")
    ] = False,
) -> None:
    """Train the VAE, then the transformer (or the stages the config names). Under torchrun, one process per GPU:
    torchrun --nproc_per_node N -m dalle train ... (backend.kind=auto picks ddp; set fsdp to shard)."""
    import yaml

    from dalle_core.config import to_dict
    from dalle_train.run_config import load_run_config

    run_config = load_run_config(config, set_)
    if dry_run:
        from dalle_train.backends import make_backend
        from dalle_train.run import prepare

        backend = make_backend(run_config.backend)
        try:
            prepare(run_config, output, backend)
        finally:
            backend.close()
        typer.echo(yaml.safe_dump(to_dict(run_config), sort_keys=False).rstrip())
        typer.echo("config OK")
        return
    from dalle_train.run import run_training

    result = run_training(run_config, output, resume=resume)
    if result.bundle_dir is not None:
        typer.echo(f"model: {result.bundle_dir}  (dalle generate --checkpoint {result.bundle_dir} --prompt ...)")
    elif result.vae_dir is not None:
        typer.echo(f"vae: {result.vae_dir / 'model'}")
