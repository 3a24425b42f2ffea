"""`dalle vae train|encode|reconstruct|import` end to end on tiny models and files written here."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.cli import main

DALLE_VAE_TESTS = Path(__file__).resolve().parents[1] / "packages" / "dalle-vae" / "tests"
HPARAMS = dict(
    image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8, num_resnet_blocks=1, channels=3
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one thread each keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dalle_vae_test_helpers(name: str) -> ModuleType | None:
    """A helper module of packages/dalle-vae/tests (they write DALLE-pytorch, taming and OpenAI files), if present."""
    path = DALLE_VAE_TESTS / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"dalle_vae_tests_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError:
        return None
    return module


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def picture(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((16, 16, 3)) * 255).astype(np.uint8)


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255


def image_folder(root: Path, count: int = 5, broken: bool = True) -> dict[str, list[str]]:
    """``count`` 16 px PNGs with captions (the first has two lines) and a corrupt PNG; returns file name -> captions."""
    root.mkdir(parents=True)
    captions = {}
    for index in range(count):
        Image.fromarray(picture(index)).save(root / f"img{index}.png")
        lines = [f"picture number {index}"] + (["another caption"] if index == 0 else [])
        (root / f"img{index}.txt").write_text("\n".join(lines) + "\n")
        captions[f"img{index}.png"] = lines
    if broken:
        (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        (root / "broken.txt").write_text("a broken picture\n")
    return captions


@pytest.fixture
def imported_vae(tmp_path, capsys) -> tuple[Path, torch.nn.Module, str]:
    """A DALLE-pytorch vae.pt imported with `dalle vae import`; returns the directory, a reference model and what
    the command printed.

    The reference is DALLE-pytorch's DiscreteVAE as the dalle-vae tests rebuild it, when those tests are present;
    otherwise our own DiscreteVAE whose weights were renamed to DALLE-pytorch's layout.
    """
    helpers = dalle_vae_test_helpers("test_dalle_pytorch_import")
    if helpers is not None:
        reference = helpers._reference(**HPARAMS)
        weights = reference.state_dict()
    else:
        from dalle_vae import DiscreteVAE
        from dalle_vae.dalle_pytorch import config_from_dalle_pytorch, dalle_pytorch_key_map

        config = config_from_dalle_pytorch(HPARAMS)
        reference = DiscreteVAE(config).eval()
        ours = reference.state_dict()
        weights = {theirs: ours[name] for theirs, name in dalle_pytorch_key_map(config).items()}
    torch.save({"hparams": HPARAMS, "weights": weights}, tmp_path / "vae.pt")
    assert main(["vae", "import", "--dalle-pytorch", str(tmp_path / "vae.pt"), "--output", str(tmp_path / "vae")]) == 0
    return tmp_path / "vae", reference, capsys.readouterr().out


def reference_codes(reference: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    encode = getattr(reference, "codebook_indices", None) or reference.encode
    with torch.no_grad():
        return encode(images)


def test_import_dalle_pytorch_vae(imported_vae):
    from dalle_core import registry

    directory, reference, printed = imported_vae
    assert printed.startswith(f"saved discrete_vae image tokenizer to {directory}: 16 codes, 16 px images -> 4x4")
    loaded = registry.load_image_tokenizer(directory)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    assert (loaded.num_tokens, loaded.image_size, loaded.fmap_size) == (16, 16, 4)
    assert torch.equal(loaded.encode(images), reference_codes(reference, images))


def test_reconstruct_a_folder(imported_vae, tmp_path, capsys):
    from dalle_core import registry

    directory, _, _ = imported_vae
    image_folder(tmp_path / "images")
    output = tmp_path / "recon"
    args = ["vae", "reconstruct", "--vae", str(directory), "--data", str(tmp_path / "images"), "--output", str(output)]
    assert main([*args, "--per-row", "4"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable: " in out and "broken.png" in out
    metrics = json.loads((output / "metrics.json").read_text())
    # Independently: the five readable pictures through the tokenizer, per-image MSE and PSNR averaged.
    vae = registry.load_image_tokenizer(directory)
    originals = torch.stack([as_tensor(picture(i)) for i in range(5)])
    codes = vae.encode(originals)
    decoded = vae.decode(codes)
    mse = ((decoded - originals) ** 2).flatten(1).mean(1).double()
    assert metrics["images"] == 5 and len(metrics["skipped"]) == 1
    assert metrics["mse"] == pytest.approx(float(mse.mean()), rel=1e-5)
    assert metrics["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-5)
    assert metrics["codes_used"] == len(torch.unique(codes)) and 0 < metrics["ssim"] <= 1
    # The grid: 4 per row, originals above reconstructions, 8x enlarged, 2 px padding between 16 px cells.
    grid = np.asarray(Image.open(output / "reconstructions.png"))
    assert grid.shape == ((4 * 18 + 2) * 8, (4 * 18 + 2) * 8, 3)

    def cell(row: int, col: int) -> np.ndarray:
        top, left = (2 + row * 18) * 8, (2 + col * 18) * 8
        return grid[top : top + 128 : 8, left : left + 128 : 8]

    as_bytes = (decoded * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(cell(0, 1), picture(1)) and np.array_equal(cell(1, 1), as_bytes[1])
    assert np.array_equal(cell(2, 0), picture(4)) and np.array_equal(cell(3, 0), as_bytes[4])


def test_train_only_the_vae_stage(tmp_path, capsys):
    from dalle_core import registry
    from dalle_train.checkpoints import latest_checkpoint
    from dalle_train.datasets.build import first_items, open_sources
    from dalle_train.run_config import DataConfig, ShapesDataConfig

    output = tmp_path / "run"
    tiny = [
        "vae.num_layers=2",
        "vae.num_tokens=16",
        "vae.codebook_dim=8",
        "vae.hidden_dim=8",
        "vae.num_resnet_blocks=0",
    ]
    sets = [f"vae.{value}" for value in tiny]
    sets += ["vae.loop.sample_every=2", "data.shapes.samples_per_spec=1", "logging.progress=false"]
    args = ["vae", "train", "--config", "tiny-cpu", "--output", str(output), "--image-size", "16", "--steps", "4"]
    assert main([*args, "--batch-size", "8", *(part for s in sets for part in ("--set", s))]) == 0
    out = capsys.readouterr().out
    assert not (output / "dalle").exists() and not (output / "model").exists()  # the recipe's dalle stage is skipped
    assert sorted(p.name for p in (output / "vae" / "samples").iterdir()) == [
        "vae-step-000002.png",
        "vae-step-000004.png",
    ]
    records = [json.loads(line) for line in (output / "vae" / "metrics.jsonl").read_text().splitlines()]
    usage = [r for r in records if "codes_used" in r]
    assert [r["step"] for r in usage] == [2, 4]
    # The last numbers are the final model's codes for the sample images (the first held-out shapes).
    model = registry.load_image_tokenizer(latest_checkpoint(output / "vae") / "model")
    shapes = ShapesDataConfig(samples_per_spec=1, validation_samples_per_spec=1)
    items = first_items(open_sources(DataConfig(kind="shapes", shapes=shapes), 16), 16, 8)
    codes = model.encode(torch.stack([item["image"] for item in items]))
    assert usage[-1]["codes_used"] == len(torch.unique(codes))
    assert f"codebook: {usage[-1]['codes_used']} of 16 codes used" in out and "reconstructions: " in out

    # Without a config: the defaults, with the shortcuts (a folder of captioned images here).
    image_folder(tmp_path / "images", broken=False)
    args = ["vae", "train", "--data", str(tmp_path / "images"), "--output", str(tmp_path / "run2"), "--steps", "2"]
    assert main([*args, "--image-size", "16", "--batch-size", "2", "--set", "logging.progress=false"]) == 0
    assert registry.load_image_tokenizer(latest_checkpoint(tmp_path / "run2" / "vae") / "model").image_size == 16


def test_encode_a_folder_then_train_the_transformer_on_the_shards(imported_vae, tmp_path, capsys):
    from dalle_core import registry
    from dalle_tokenizers import SimpleTokenizer
    from dalle_train.bundle import load_bundle
    from dalle_train.datasets.token_shards import TokenShards

    directory, _, _ = imported_vae
    captions = image_folder(tmp_path / "images")
    shards = tmp_path / "shards"
    args = ["vae", "encode", "--vae", str(directory), "--data", str(tmp_path / "images"), "--output", str(shards)]
    assert main([*args, "--text-seq-len", "16", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    summary = next(line for line in out.splitlines() if line.startswith("encoded "))
    assert summary.startswith(f"encoded 5 images (6 captions) into 1 shards at {shards}; skipped 1 unreadable: ")
    assert f"{tmp_path / 'images' / 'broken.png'}: UnidentifiedImageError" in summary
    index = json.loads((shards / "index.json").read_text())
    assert index["count"] == 6 and index["skipped"] == 1 and "broken.png" in index["skipped_samples"][0]

    vae, tokenizer = registry.load_image_tokenizer(directory), SimpleTokenizer()
    rows = TokenShards(shards)
    expected = [(name, line) for name, lines in sorted(captions.items()) for line in lines]
    assert [rows[i]["caption"] for i in range(len(rows))] == [line for _, line in expected]
    for i, (name, line) in enumerate(expected):
        pixels = np.asarray(Image.open(tmp_path / "images" / name))
        assert torch.equal(rows[i]["image_ids"], vae.encode(as_tensor(pixels)[None])[0])
        assert torch.equal(rows[i]["text_ids"], tokenizer.encode([line], 16)[0])

    run = tmp_path / "run"
    sets = [
        "stages=[dalle]",
        "data.kind=token_shards",
        f"data.path={shards}",
        f"image_tokenizer={directory}",
        f"tokenizer.path={shards / 'text_tokenizer'}",
        "dalle.text_seq_len=16",
        "dalle.loop.steps=3",
        "dalle.loop.batch_size=2",
        "dalle.loop.sample_every=3",
        "dalle.model.dim=16",
        "dalle.model.depth=1",
        "dalle.sample_prompts=[picture number 1]",
        "logging.progress=false",
    ]
    assert main(["train", "--config", "tiny-cpu", "--output", str(run), *(p for s in sets for p in ("--set", s))]) == 0
    records = [json.loads(line) for line in (run / "dalle" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 3 and not (run / "vae").exists()
    bundle = load_bundle(run / "model")
    assert bundle.model.config.text_seq_len == 16 and bundle.image_tokenizer.num_tokens == 16


def test_encode_webdataset_shards_and_the_shapes_held_out_split(imported_vae, tmp_path, capsys):
    from dalle_train.datasets.shapes import split_specs
    from dalle_train.datasets.tar_shards import write_tar_shard
    from dalle_train.datasets.token_shards import TokenShards

    directory, _, _ = imported_vae
    samples = []
    for index in range(3):
        data = io.BytesIO()
        Image.fromarray(picture(index)).save(data, format="PNG")
        samples.append((f"{index:04d}", data.getvalue(), "png", f"shard picture {index}"))
    samples.append(("0003", b"not a png at all", "png", "the last one is broken"))
    write_tar_shard(tmp_path / "data.tar", samples)
    args = ["vae", "encode", "--vae", str(directory), "--data", str(tmp_path / "data.tar"), "--output"]
    assert main([*args, str(tmp_path / "wds")]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("encoded "))
    assert (
        summary.startswith("encoded 3 images (3 captions) into 1 shards") and f"{tmp_path / 'data.tar'}:0003" in summary
    )
    assert [TokenShards(tmp_path / "wds")[i]["caption"] for i in range(3)] == [f"shard picture {i}" for i in range(3)]

    assert main([*args, str(tmp_path / "held"), "--data", "shapes", "--split", "validation"]) == 0
    held_out = split_specs(0, 0.15)[1]
    rows = TokenShards(tmp_path / "held")
    assert len(rows) == 2 * len(held_out)  # validation_samples_per_spec defaults to 2
    assert {rows[i]["caption"] for i in range(len(rows))} == {spec.caption for spec in held_out}
    assert "skipped 0" in capsys.readouterr().out


def test_import_taming_and_openai_files(tmp_path):
    from dalle_core import registry
    from dalle_vae import OpenAIDiscreteVAE, VQGanVAE

    taming = dalle_vae_test_helpers("vqgan_files")
    openai = dalle_vae_test_helpers("test_openai_dvae")
    if taming is None or openai is None:
        pytest.skip("the dalle-vae test helpers that write taming and OpenAI files are not present")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    checkpoint, config, _ = taming.write_taming_files(tmp_path / "taming")
    args = ["--taming-checkpoint", str(checkpoint), "--taming-config", str(config), "--output", str(tmp_path / "vq")]
    assert main(["vae", "import", *args]) == 0
    direct, loaded = VQGanVAE.from_taming(checkpoint, config), registry.load_image_tokenizer(tmp_path / "vq")
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), direct.encode(images))
        assert torch.equal(loaded.decode(direct.encode(images)), direct.decode(direct.encode(images)))

    openai.write_pickles(tmp_path / "openai")
    args = ["--openai", str(tmp_path / "openai"), "--image-size", "16", "--output", str(tmp_path / "dvae")]
    assert main(["vae", "import", *args]) == 0
    direct = OpenAIDiscreteVAE.from_openai_pickles(tmp_path / "openai", image_size=16)
    loaded = registry.load_image_tokenizer(tmp_path / "dvae")
    with torch.no_grad():
        assert loaded.image_size == 16 and torch.equal(loaded.encode(images), direct.encode(images))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "--output", "{tmp}/o"], "error: give exactly one of --dalle-pytorch FILE"),
        (["import", "--output", "{tmp}/o", "--dalle-pytorch", "a.pt", "--openai", "d"], "error: give exactly one of"),
        (["import", "--output", "{tmp}/o", "--dalle-pytorch", "{tmp}/no.pt"], "error: DALLE-pytorch vae.pt not found"),
        (["import", "--output", "{tmp}/o", "--taming-checkpoint", "x.ckpt"], "error: a taming VQGAN needs both"),
        (
            ["encode", "--vae", "{tmp}/none", "--data", "shapes", "--output", "{tmp}/o"],
            "error: image tokenizer not found",
        ),
        (
            ["encode", "--vae", "{tmp}", "--data", "shapes", "--output", "{tmp}/o"],
            "error: {tmp} holds no image tokenizer",
        ),
        (["reconstruct", "--vae", "{tmp}/none", "--output", "{tmp}/o"], "error: image tokenizer not found"),
        (["train", "--data", "{tmp}/nowhere", "--output", "{tmp}/o"], "error: --data: expected shapes, openmoji"),
        (
            ["train", "--config", "tiny-cpu", "--set", "vae.loop.steps=x", "--output", "{tmp}/o"],
            "error: vae.loop.steps",
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main(["vae", *(arg.format(tmp=tmp_path) for arg in args)]) == 2
    assert one_line_error(capsys).startswith(message.format(tmp=tmp_path))
    assert not (tmp_path / "o").exists()


def test_reconstruct_data_must_exist(imported_vae, tmp_path, capsys):
    directory, _, _ = imported_vae
    args = ["vae", "reconstruct", "--vae", str(directory), "--data", str(tmp_path / "nope"), "--output", str(tmp_path)]
    assert main(args) == 2
    assert one_line_error(capsys).startswith("error: --data: expected shapes, openmoji or a folder of images")


def test_help_lists_every_command_without_importing_torch():
    import re
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\nfrom dalle.cli import main\nout = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n    main(['--help'])\n    main(['vae', 'encode', '--help'])\n"
        "print(out.getvalue())\nprint('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed = re.findall(r"^│ (\w+) ", result.split("Commands")[1], flags=re.MULTILINE)
    assert listed == ["demo", "generate", "train", "eval", "vae", "tokenizer", "clip", "checkpoint"]
    assert "--text-seq-len" in result and result.strip().endswith("False")
