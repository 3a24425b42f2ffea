"""``dalle vae ...``: image tokenizers. Train a DiscreteVAE, encode a dataset into token shards once, look at
reconstructions, and import DALLE-pytorch / OpenAI / taming weights into our saved-tokenizer format.

Mounted on the root app as ``vae``. Only typer is imported at module level, so ``dalle --help`` stays fast.

Wherever a command takes ``--vae DIR``, DIR may be a saved image tokenizer (a directory with ``spec.json``, e.g.
what ``dalle vae import`` writes), a generation bundle (its ``image_tokenizer/``), or the output of ``dalle vae
train`` / ``dalle train`` (the newest VAE checkpoint in it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    import torch

    from dalle_core.protocols import ImageTokenizer, TextTokenizer

app = typer.Typer(
    help="Image tokenizers: train a VAE, encode datasets to token shards, reconstruct, import weights.",
    no_args_is_help=True,
)

SetOption = Annotated[
    list[str], typer.Option("--set", help="Config override KEY=VALUE, e.g. vae.vae.num_layers=3 (repeatable).")
]
DATA_HELP = (
    "shapes, openmoji, a folder of images with same-stem .txt captions, or WebDataset .tar shards "
    "(paths, globs, {000..009} braces, ::-joined)"
)
SHOWN_SKIPS = 5  # unreadable samples named in a summary line; all are counted and listed in the index


# --------------------------------------------------------------------------------------------------- helpers


def data_settings(data: str) -> dict[str, Any]:
    """The ``data:`` config section a ``--data`` value means."""
    from dalle_core.errors import DataError

    if data in ("shapes", "openmoji"):
        return {"kind": data}
    if Path(data).is_dir():
        return {"kind": "folder", "path": data}
    if Path(data).is_file() or data.endswith(".tar") or any(mark in data for mark in ("::", "{", "*", "://", "pipe:")):
        return {"kind": "webdataset", "path": data}
    raise DataError(f"--data: expected {DATA_HELP}; got {data!r}, which is none of them (no such folder or file)")


def image_tokenizer_dir(path: Path) -> Path:
    """The saved image tokenizer that ``--vae PATH`` names (see the module doc)."""
    from dalle_core.errors import CheckpointError
    from dalle_train.checkpoints import latest_checkpoint

    if not path.exists():
        raise CheckpointError(f"image tokenizer not found: {path}")
    candidates = [path, path / "image_tokenizer", path / "model" / "image_tokenizer", path / "model"]
    for run_dir in (path, path / "vae"):
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            candidates.append(checkpoint / "model")
    for candidate in candidates:
        if (candidate / "spec.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path} holds no image tokenizer: expected spec.json (a saved tokenizer), image_tokenizer/ (a model "
        "bundle), or VAE checkpoints (the output of `dalle vae train`)"
    )


def load_image_tokenizer(path: Path, device: str = "cpu") -> tuple[ImageTokenizer, Path]:
    from dalle_core import registry

    directory = image_tokenizer_dir(path)
    tokenizer = registry.load_image_tokenizer(directory)
    if hasattr(tokenizer, "eval"):
        tokenizer = tokenizer.to(device).eval()  # type: ignore[attr-defined]
    return tokenizer, directory


def load_text_tokenizer(spec: str) -> TextTokenizer:
    """``--tokenizer``: a saved tokenizer directory, a registered kind (``simple``), or ``KIND:FILE``."""
    from dalle_core import registry
    from dalle_tokenizers import build_text_tokenizer

    if Path(spec).is_dir():
        return registry.load_text_tokenizer(spec)
    kind, _, file = spec.partition(":")
    return build_text_tokenizer(kind, file or None)


def to_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """Data sources give RGB; a one-channel tokenizer gets the mean of the three."""
    return image.mean(dim=0, keepdim=True) if channels == 1 and image.shape[0] == 3 else image


def shorten(reasons: list[str]) -> str:
    shown = "; ".join(reasons[:SHOWN_SKIPS])
    return shown + (f"; and {len(reasons) - SHOWN_SKIPS} more" if len(reasons) > SHOWN_SKIPS else "")


def describe(dataset: Any, index: int) -> str:
    named = getattr(dataset, "describe", None)
    return named(index) if named is not None else f"item {index}"


def all_captions(dataset: Any, index: int) -> list[str] | None:
    """Every caption line of a folder image (an unwrapped ``ImageTextFolder``), or None for other sources."""
    from dalle_train.datasets.build import IndexedView
    from dalle_train.datasets.folder import ImageTextFolder, caption_lines

    if isinstance(dataset, IndexedView):
        dataset, index = dataset.dataset, dataset.indices[index]
    if isinstance(dataset, ImageTextFolder):
        return caption_lines(dataset.pairs[index][1].read_text(encoding="utf-8"))
    return None


# ------------------------------------------------------------------------------------------------------ train


@app.command()
def train(
    output: Annotated[Path, typer.Option(help="Run directory: vae/ checkpoints, samples, metrics.jsonl.")],
    config: Annotated[
        str | None, typer.Option(help="A run config file or recipe (tiny-cpu, ...); only its vae stage runs.")
    ] = None,
    data: Annotated[str | None, typer.Option(help=f"Training images: {DATA_HELP}.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image side (vae.vae.image_size).")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (vae.loop.steps).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step (vae.loop.batch_size).")] = None,
    set_: SetOption = [],  # noqa: B006 - typer reads the default, it is never mutated
    resume: Annotated[
        bool, typer.Option("--resume/--fresh", help="Continue from the newest checkpoint, or delete OUTPUT first.")
    ] = True,
) -> None:
    """Train only the discrete VAE (the `vae` stage of `dalle train`). Every vae.loop.sample_every steps it writes
    OUTPUT/vae/samples/vae-step-N.png (originals above reconstructions) and codebook usage to metrics.jsonl."""
    from dalle_core.config import apply_overrides, from_dict, read_config_file
    from dalle_train.recipes import recipe_path
    from dalle_train.run import run_training
    from dalle_train.run_config import RunConfig

    settings: dict[str, Any] = {}
    if config is not None:
        settings = read_config_file(Path(config) if Path(config).is_file() else recipe_path(config))
    settings.setdefault("data", {})
    settings.setdefault("vae", {})
    if data is not None:
        settings["data"] = {**settings["data"], "path": None, **data_settings(data)}
    shortcuts = ((image_size, "vae", "image_size"), (steps, "loop", "steps"), (batch_size, "loop", "batch_size"))
    for value, section, key in shortcuts:
        if value is not None:
            settings["vae"][section] = {**settings["vae"].get(section, {}), key: value}
    settings = apply_overrides(settings, set_)
    settings["stages"], settings["image_tokenizer"] = ["vae"], None  # this command trains the VAE and nothing else
    run_config = from_dict(RunConfig, settings)
    result = run_training(run_config, output, resume=resume)
    assert result.vae_dir is not None
    typer.echo(f"vae: {result.vae_dir / 'model'}  (dalle vae encode --vae {output} ...)")
    samples = sorted((output / "vae" / "samples").glob("vae-step-*.png"))
    if samples:
        typer.echo(f"reconstructions: {samples[-1]}")
    usage = last_record(output / "vae" / "metrics.jsonl", "codes_used")
    if usage is not None:
        typer.echo(
            f"codebook: {usage['codes_used']} of {run_config.vae.vae.num_tokens} codes used "
            f"({usage['usage_fraction']:.0%}), perplexity {usage['perplexity']:.1f} at step {usage['step']}"
        )


def last_record(path: Path, key: str) -> dict[str, Any] | None:
    """The last line of a metrics.jsonl that holds ``key``."""
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and key in record:
            found = record
    return found


# ----------------------------------------------------------------------------------------------------- encode


@app.command()
def encode(
    vae: Annotated[Path, typer.Option(help="The image tokenizer (see `dalle vae --help`).")],
    data: Annotated[str, typer.Option(help=f"Images with captions: {DATA_HELP}.")],
    output: Annotated[Path, typer.Option(help="Token-shard directory to write (replaced if it exists).")],
    tokenizer: Annotated[
        str, typer.Option(help="Text tokenizer: a kind (simple, clip-bpe), KIND:FILE (hf:tokenizer.json), or a DIR.")
    ] = "simple",
    text_seq_len: Annotated[int, typer.Option(help="Text ids per caption (the transformer's text_seq_len).")] = 48,
    split: Annotated[
        str, typer.Option(help="'train' or 'validation' (held-out shapes/openmoji, or --set validation_fraction=F).")
    ] = "train",
    every_caption: Annotated[
        bool, typer.Option(help="Folders: one row per caption line of an image (else one caption per image).")
    ] = True,
    truncate_captions: Annotated[bool, typer.Option(help="Cut long captions (else skip them).")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per encoder call.")] = 64,
    shard_size: Annotated[int, typer.Option(help="Rows per shard.")] = 10_000,
    device: Annotated[str, typer.Option(help="torch device for the encoder, e.g. cpu or cuda.")] = "cpu",
    set_: Annotated[
        list[str], typer.Option("--set", help="Data config override, e.g. shapes.samples_per_spec=2 (repeatable).")
    ] = [],  # noqa: B006
) -> None:
    """Encode a dataset once into token shards (text ids, image ids, captions) for `data.kind: token_shards`, so
    transformer training never runs the image encoder. Unreadable samples are skipped, counted and named."""
    from dalle_core.config import apply_overrides, from_dict
    from dalle_core.errors import ConfigError, DataError
    from dalle_train.datasets.build import open_sources
    from dalle_train.datasets.token_shards import write_token_shards
    from dalle_train.progress import make_progress
    from dalle_train.run_config import DataConfig

    if split not in ("train", "validation"):
        raise ConfigError(f"--split must be 'train' or 'validation', got {split!r}")
    settings = from_dict(DataConfig, apply_overrides(data_settings(data), set_), prefix="data")
    if settings.kind == "token_shards":
        raise DataError("--data: these are token shards already")
    image_tokenizer, tokenizer_dir = load_image_tokenizer(vae, device)
    text_tokenizer = load_text_tokenizer(tokenizer)
    sources = open_sources(settings, image_tokenizer.image_size)
    source = sources.train if split == "train" else sources.validation
    if source is None:
        raise DataError(f"--split validation: {data} has no validation split; try --set validation_fraction=0.1")
    counts = {"images": 0, "rows": 0}
    skipped: list[str] = []
    pairs = (
        stream_pairs(source, image_tokenizer.image_size, skipped)
        if sources.streamed
        else map_pairs(source, every_caption, skipped)
    )
    with make_progress() as progress:
        task = progress.add_task("encode images", total=None if sources.streamed else len(source), status="")
        batches = encode_batches(
            pairs, image_tokenizer, text_tokenizer, text_seq_len, truncate_captions, batch_size, device, counts, skipped
        )
        advanced = advance_with(batches, lambda: progress.update(task, completed=counts["images"] + len(skipped)))
        try:
            index = write_token_shards(
                output, advanced, text_tokenizer, image_tokenizer, shard_size, str(tokenizer_dir)
            )
        except DataError as error:
            if not skipped:
                raise
            raise DataError(f"{error}: all {len(skipped)} were unreadable, e.g. {skipped[0]}") from None
    if skipped:
        record_skips(output, index, skipped)
    line = (
        f"encoded {counts['images']} images ({counts['rows']} captions) into {len(index['shards'])} shards at {output}"
    )
    typer.echo(line + (f"; skipped {len(skipped)} unreadable: {shorten(skipped)}" if skipped else "; skipped 0"))
    typer.echo(
        f"train on them: dalle train --config CONFIG --set stages=[dalle] --set data.kind=token_shards "
        f"--set data.path={output} --set image_tokenizer={tokenizer_dir} --set tokenizer.path={output}/text_tokenizer"
    )


def advance_with(batches: Iterator[Any], update: Callable[[], object]) -> Iterator[Any]:
    """``batches``, calling ``update`` after each (to move a progress bar)."""
    for batch in batches:
        update()
        yield batch


def map_pairs(dataset: Any, every_caption: bool, skipped: list[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """``(image, captions)`` of each readable item of a map-style dataset; unreadable ones are named in ``skipped``."""
    from dalle_train.datasets.samples import describe_failure, read_item

    for index in range(len(dataset)):
        try:
            item = read_item(dataset, index, 0)
            captions = (all_captions(dataset, index) if every_caption else None) or [item["caption"]]
        except Exception as error:  # a corrupt file must not stop the run: it is named in the summary
            skipped.append(describe_failure(describe(dataset, index), error))
            continue
        yield item["image"], captions


def stream_pairs(shards: list[str], image_size: int, skipped: list[str]) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """``(image, [caption])`` of each readable sample of WebDataset shards, in order; the unreadable ones (a
    trailing one and a cut-off shard included) are named in ``skipped``."""
    import numpy as np

    from dalle_train.datasets.samples import describe_failure
    from dalle_train.datasets.tar_shards import decode_group, iter_tar_groups, open_shard

    rng = np.random.default_rng(0)  # picks one line of a multi-line caption, reproducibly
    for shard in shards:
        try:
            with open_shard(shard) as stream:
                for key, group in iter_tar_groups(stream):
                    try:
                        item = decode_group(group, image_size, rng)
                    except Exception as error:  # named in the summary; the run goes on
                        skipped.append(describe_failure(f"{shard}:{key}", error))
                        continue
                    yield item["image"], [item["caption"]]
        except Exception as error:
            skipped.append(describe_failure(f"{shard} (rest of shard)", error))


def encode_batches(
    pairs: Iterator[tuple[torch.Tensor, list[str]]],
    image_tokenizer: ImageTokenizer,
    text_tokenizer: TextTokenizer,
    text_seq_len: int,
    truncate: bool,
    batch_size: int,
    device: str,
    counts: dict[str, int],
    skipped: list[str],
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(text_ids, image_ids, captions)`` batches: each image encoded once, repeated for each of its captions."""
    import torch

    from dalle_core.errors import DalleError

    pending: list[tuple[torch.Tensor, list[str]]] = []

    def flush() -> tuple[torch.Tensor, torch.Tensor, list[str]] | None:
        images = torch.stack([to_channels(image, image_tokenizer.channels) for image, _ in pending])
        with torch.no_grad():
            codes = image_tokenizer.encode(images.to(device)).cpu()
        texts, rows, captions = [], [], []
        for (_, lines), image_codes in zip(pending, codes, strict=True):
            for caption in lines:
                try:
                    texts.append(text_tokenizer.encode([caption], text_seq_len, truncate=truncate)[0])
                except DalleError as error:  # e.g. a caption too long without truncation
                    skipped.append(f"caption {caption[:40]!r}: {error}")
                    continue
                rows.append(image_codes)
                captions.append(caption)
        counts["images"] += len(pending)
        counts["rows"] += len(captions)
        pending.clear()
        return (torch.stack(texts), torch.stack(rows), captions) if captions else None

    for pair in pairs:
        pending.append(pair)
        if len(pending) == batch_size:
            batch = flush()
            if batch is not None:
                yield batch
    if pending:
        batch = flush()
        if batch is not None:
            yield batch


def record_skips(directory: Path, index: dict[str, Any], skipped: list[str]) -> None:
    """Add the skipped samples to ``index.json`` (rewritten atomically: a temporary file, then a rename)."""
    import os

    from dalle_core.checkpoint import write_json

    index = {**index, "skipped": len(skipped), "skipped_samples": skipped}
    temporary = directory / ".index.json.tmp"
    write_json(temporary, index)
    os.replace(temporary, directory / "index.json")


# ------------------------------------------------------------------------------------------------ reconstruct


@app.command()
def reconstruct(
    vae: Annotated[Path, typer.Option(help="The image tokenizer (see `dalle vae --help`).")],
    data: Annotated[
        str, typer.Option(help="shapes (held-out compositions), openmoji, or a folder of images (captions not needed).")
    ] = "shapes",
    output: Annotated[Path, typer.Option(help="Directory for reconstructions.png and metrics.json.")] = Path(
        "reconstructions"
    ),
    count: Annotated[int, typer.Option(help="Images to reconstruct, spread evenly over the data.")] = 16,
    per_row: Annotated[int, typer.Option(help="Images per row of the grid.")] = 8,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda.")] = "cpu",
) -> None:
    """Encode and decode images: OUTPUT/reconstructions.png (each row of originals above its reconstructions) and
    OUTPUT/metrics.json (MSE, PSNR, SSIM, codebook usage)."""
    import torch

    from dalle_core.errors import ConfigError
    from dalle_core.images import save_image_grid
    from dalle_eval.metrics import reconstruction_metrics

    if count < 1 or per_row < 1:
        raise ConfigError(f"--count and --per-row must be >= 1, got {count} and {per_row}")
    tokenizer, directory = load_image_tokenizer(vae, device)
    pictures, skipped = reconstruction_images(data, tokenizer.image_size, count)
    images = torch.stack([to_channels(picture, tokenizer.channels) for picture in pictures]).to(device)
    with torch.no_grad():
        decoded = tokenizer.decode(tokenizer.encode(images)).float().clamp(0, 1)
        metrics = reconstruction_metrics(tokenizer, images)
    rows = []
    for start in range(0, len(images), per_row):
        rows += [images[start : start + per_row].cpu(), decoded[start : start + per_row].cpu()]
        pad = per_row - len(rows[-1])
        if pad and len(images) > per_row:  # fill a short last pair of rows so reconstructions stay under originals
            blank = torch.ones(pad, *images.shape[1:])
            rows[-2], rows[-1] = torch.cat([rows[-2], blank]), torch.cat([rows[-1], blank])
    output.mkdir(parents=True, exist_ok=True)
    scale = max(1, 128 // tokenizer.image_size)
    save_image_grid(torch.cat(rows), output / "reconstructions.png", nrow=min(per_row, len(images)), scale=scale)
    record = {"vae": str(directory), "data": data, "images": len(images), "skipped": skipped, **metrics}
    (output / "metrics.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    quality = f"MSE {metrics['mse']:.4f}, PSNR {metrics['psnr']:.2f} dB"
    if "ssim" in metrics:
        quality += f", SSIM {metrics['ssim']:.3f}"
    typer.echo(
        f"{len(images)} images: {quality}; codebook: {metrics['codes_used']} of {tokenizer.num_tokens} codes used, "
        f"perplexity {metrics['perplexity']:.1f}"
    )
    if skipped:
        typer.echo(f"skipped {len(skipped)} unreadable: {shorten(skipped)}")
    typer.echo(f"wrote {output / 'reconstructions.png'} and {output / 'metrics.json'}")


def reconstruction_images(data: str, image_size: int, count: int) -> tuple[list[torch.Tensor], list[str]]:
    """Up to ``count`` images spread over the data (held-out splits of the built-ins), and the unreadable ones."""
    import torch
    from PIL import Image

    from dalle_core.errors import DataError
    from dalle_core.images import from_pil
    from dalle_train.datasets.samples import describe_failure, read_item

    skipped: list[str] = []
    if data in ("shapes", "openmoji"):
        from dalle_train.datasets.build import open_sources
        from dalle_train.run_config import DataConfig

        sources = open_sources(DataConfig(kind=data), image_size)  # type: ignore[arg-type]
        dataset = sources.validation if sources.validation is not None else sources.train
        total = len(dataset)

        def read(index: int) -> torch.Tensor:
            return read_item(dataset, index, 0)["image"]

        def name(index: int) -> str:
            return describe(dataset, index)

    else:
        from dalle_train.datasets.folder import IMAGE_SUFFIXES

        folder = Path(data)
        if not folder.is_dir():
            raise DataError(f"--data: expected shapes, openmoji or a folder of images, got {data!r}")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DataError(f"found no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        total = len(files)

        def read(index: int) -> torch.Tensor:
            with Image.open(files[index]) as picture:
                return from_pil(picture, image_size)

        def name(index: int) -> str:
            return str(files[index])

    images = []
    for index in torch.linspace(0, total - 1, min(count, total)).round().long().unique().tolist():
        try:
            images.append(read(index))
        except Exception as error:  # named and skipped, as in training
            skipped.append(describe_failure(name(index), error))
    if not images:
        raise DataError(f"none of the images picked from {data} could be read: {shorten(skipped)}")
    return images, skipped


# ----------------------------------------------------------------------------------------------------- import


@app.command("import")
def import_weights(
    output: Annotated[Path, typer.Option(help="Directory for the image tokenizer (use it with --vae DIR).")],
    dalle_pytorch: Annotated[Path | None, typer.Option(help="A DALLE-pytorch vae.pt (train_vae.py's output).")] = None,
    openai: Annotated[
        Path | None, typer.Option(help="A directory with OpenAI's dVAE encoder.pkl and decoder.pkl.")
    ] = None,
    taming_checkpoint: Annotated[Path | None, typer.Option(help="A taming-transformers VQGAN .ckpt.")] = None,
    taming_config: Annotated[Path | None, typer.Option(help="Its .yaml (with --taming-checkpoint).")] = None,
    image_size: Annotated[
        int | None, typer.Option(help="--openai / taming: the image side encode accepts (default 256 / the yaml's).")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            help="vae.pt / .ckpt: allow torch.load to run code from the file when its plain-data reading fails. "
            "Only for files you trust. (OpenAI's pickles never run code.)"
        ),
    ] = False,
) -> None:
    """Convert pretrained VAE weights into a saved image tokenizer: give one of --dalle-pytorch, --openai, or
    --taming-checkpoint with --taming-config. Use the result as --vae DIR, or as image_tokenizer: DIR in a config."""
    from dalle_core.errors import CheckpointError, ConfigError

    given = [name for name, value in (("--dalle-pytorch", dalle_pytorch), ("--openai", openai)) if value is not None]
    if taming_checkpoint is not None or taming_config is not None:
        given.append("--taming-checkpoint")
    if len(given) != 1:
        raise ConfigError(
            "give exactly one of --dalle-pytorch FILE, --openai DIR, --taming-checkpoint FILE --taming-config FILE; "
            f"got {', '.join(given) or 'none'}"
        )
    model: Any
    if dalle_pytorch is not None:
        from dalle_vae import load_dalle_pytorch_vae

        if image_size is not None:
            raise ConfigError("--image-size: a vae.pt names its own image size; drop the option")
        if not dalle_pytorch.is_file():
            raise CheckpointError(f"DALLE-pytorch vae.pt not found: {dalle_pytorch}")
        model = load_dalle_pytorch_vae(dalle_pytorch, trust_pickle=trust_pickle)
    elif openai is not None:
        from dalle_vae import OpenAIDiscreteVAE

        if not openai.exists():
            raise CheckpointError(f"OpenAI dVAE directory not found: {openai}")
        model = OpenAIDiscreteVAE.from_openai_pickles(openai, image_size=image_size or 256)
    else:
        from dalle_vae import VQGanVAE

        if taming_checkpoint is None or taming_config is None:
            raise ConfigError("a taming VQGAN needs both --taming-checkpoint FILE.ckpt and --taming-config FILE.yaml")
        model = VQGanVAE.from_taming(taming_checkpoint, taming_config, image_size=image_size, trust_pickle=trust_pickle)
    model.save(output)
    side = model.fmap_size
    typer.echo(
        f"saved {model.kind} image tokenizer to {output}: {model.num_tokens} codes, {model.image_size} px images -> "
        f"{side}x{side} tokens (use --vae {output}, or image_tokenizer: {output} in a training config)"
    )
