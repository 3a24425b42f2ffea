"""`dalle generate` end to end on a tiny random checkpoint: every flag, checked against direct transformer calls."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dalle.cli import main

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared: one thread each keeps timings predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random-weight bundle: DiscreteVAE (16 px, 16 codes, 4x4 grid), SimpleTokenizer, 1-layer DALLE."""
    from dalle_tokenizers import SimpleTokenizer
    from dalle_train.bundle import save_bundle
    from dalle_transformer import DALLE, DALLEConfig
    from dalle_vae import DiscreteVAE, DiscreteVAEConfig

    torch.manual_seed(0)
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8))
    config = DALLEConfig(
        num_text_tokens=SimpleTokenizer().vocab_size,
        text_seq_len=24,
        num_image_tokens=16,
        image_fmap_size=4,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
    )
    model = DALLE(config)
    with torch.no_grad():  # large random weights: peaked logits that depend on the text, so guidance shows
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("generate") / "model"
    save_bundle(directory, model, SimpleTokenizer(), vae.eval())
    return directory


@pytest.fixture(scope="module")
def bundle(checkpoint):
    from dalle_train.bundle import load_bundle

    return load_bundle(checkpoint)


def reference(bundle, prompts, n, seed, **kwargs) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The image ids and 8-bit images the documented seeding gives: one direct `generate_image_ids` call per image."""
    from dalle_eval.pipeline import image_seed

    rows = []
    for prompt in prompts:
        for sample in range(n):
            text = bundle.text_tokenizer.encode([prompt], bundle.model.config.text_seq_len)
            generator = torch.Generator().manual_seed(image_seed(seed, prompt, sample))
            rows.append(bundle.model.generate_image_ids(text, generator=generator, **kwargs))
    ids = torch.cat(rows)
    with torch.no_grad():
        images = bundle.image_tokenizer.decode(ids).clamp(0, 1)
    return ids, [(image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy() for image in images]


def saved(output: Path) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The image ids and pictures `dalle generate` wrote."""
    sidecar = json.loads((output / "generations.json").read_text())
    ids = torch.from_numpy(np.load(output / sidecar["image_ids_file"])).long()
    return ids, [np.asarray(Image.open(output / record["file"])) for record in sidecar["images"]]


def same_pictures(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def run(*args: str) -> int:
    return main(["generate", *args])


def test_sampling_flags_reach_the_model(checkpoint, bundle, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"\n{PROMPTS[1]}\n")
    output = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--prompts-file", str(prompts_file)]
    flags = ["--top-k", "3", "--top-p", "0.9", "--temperature", "0.8", "--cond-scale", "3", "--seed", "4"]
    assert run(*args, *flags, "--num-images", "2", "--batch-size", "3", "--output", str(output)) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    sidecar = json.loads((output / "generations.json").read_text())
    assert [r["prompt"] for r in sidecar["images"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert {k: sidecar["options"][k] for k in ("top_k", "top_p", "temperature", "cond_scale", "seed")} == {
        "top_k": 3,
        "top_p": 0.9,
        "temperature": 0.8,
        "cond_scale": 3.0,
        "seed": 4,
    }
    assert sidecar["metadata"]["checkpoint"] == str(checkpoint) and sidecar["priming"] is None
    ids, pictures = saved(output)
    options = {"top_k": 3, "top_p": 0.9, "temperature": 0.8, "cond_scale": 3.0}
    expected_ids, expected_pictures = reference(bundle, PROMPTS, 2, 4, **options)
    assert torch.equal(ids, expected_ids) and same_pictures(pictures, expected_pictures)
    for left_out in options:  # each flag changes this draw, so none can have been dropped on the way
        others = {key: value for key, value in options.items() if key != left_out}
        assert not torch.equal(ids, reference(bundle, PROMPTS, 2, 4, **others)[0]), left_out


def test_cond_scale_one_is_no_guidance(checkpoint, tmp_path):
    base = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--num-images", "3", "--seed", "2"]
    assert run(*base, "--output", str(tmp_path / "plain")) == 0
    assert run(*base, "--cond-scale", "1", "--output", str(tmp_path / "one")) == 0
    assert run(*base, "--cond-scale", "5", "--output", str(tmp_path / "five")) == 0
    plain, one, five = (saved(tmp_path / name) for name in ("plain", "one", "five"))
    assert torch.equal(plain[0], one[0]) and same_pictures(plain[1], one[1])
    assert not torch.equal(plain[0], five[0])


def test_priming_keeps_the_first_tokens_of_the_image(checkpoint, bundle, tmp_path):
    picture = (np.random.default_rng(1).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "prime.png")
    # Already 16 px, so no resize: the image's codes straight from the tokenizer.
    codes = bundle.image_tokenizer.encode(torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255)[0]
    output = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--num-images", "2", "--seed", "6"]
    priming = ["--priming-image", str(tmp_path / "prime.png"), "--priming-tokens", "5"]
    assert run(*args, *priming, "--output", str(output)) == 0
    sidecar = json.loads((output / "generations.json").read_text())
    assert sidecar["priming"] == {
        "num_tokens": 5,
        "source": str(tmp_path / "prime.png"),
        "image_ids": codes[:5].tolist(),
    }
    assert {record["priming_tokens"] for record in sidecar["images"]} == {5}
    ids, pictures = saved(output)
    assert torch.equal(ids[:, :5], codes[:5].expand(2, -1))  # the first 5 codes of every image are the picture's
    expected = reference(bundle, PROMPTS[:1], 2, 6, init_image_ids=codes[None, :5], num_init_img_tokens=5)
    assert torch.equal(ids, expected[0]) and same_pictures(pictures, expected[1])
    # Without --priming-tokens, DALLE-pytorch's share of the image is kept: int(0.4375 * 16) = 7 tokens.
    assert run(*args, "--priming-image", str(tmp_path / "prime.png"), "--output", str(tmp_path / "default")) == 0
    assert json.loads((tmp_path / "default" / "generations.json").read_text())["priming"]["image_ids"] == (
        codes[:7].tolist()
    )


def test_progress_writes_partial_images(checkpoint, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--num-images", "2", "--progress"]
    assert run(*args, "--progress-every", "6", "--output", str(output)) == 0
    assert "6 previews" in capsys.readouterr().out
    names = sorted(path.name for path in (output / "progress").iterdir())
    assert names == [f"{image:04d}-step-{step:04d}.png" for image in (0, 1) for step in (6, 12, 16)]
    finals = saved(output)[1]
    for image in (0, 1):
        last = np.asarray(Image.open(output / "progress" / f"{image:04d}-step-0016.png"))
        assert np.array_equal(last, finals[image])  # the last preview is the finished image
        early = np.asarray(Image.open(output / "progress" / f"{image:04d}-step-0006.png"))
        # 6 of 16 tokens known (4x4 grid, 4 px per token): rows 2-3 and the right half of row 1 are grey.
        assert (early[8:] == 128).all() and (early[4:8, 8:] == 128).all()
        assert not (early[:4] == 128).all()


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs dalle-eval[clip]")
def test_rerank_keeps_the_best_candidates(checkpoint, bundle, tmp_path):
    from dalle_eval.clip import load_clip
    from dalle_eval.pipeline import SamplingOptions, generate

    clip_args = ["clip", "train", "--output", str(tmp_path / "clip"), "--steps", "1", "--batch-size", "8"]
    assert main([*clip_args, "--samples-per-spec", "1", "--image-size", "16", "--set", "width=32"]) == 0
    output = tmp_path / "out"
    args = ["--checkpoint", str(checkpoint), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "1"]
    rerank = ["--rerank", str(tmp_path / "clip"), "--candidates", "4", "--num-images", "2"]
    assert run(*args, *rerank, "--output", str(output)) == 0
    sidecar = json.loads((output / "generations.json").read_text())
    # Candidate s of a prompt is the same image whatever the count drawn (per-image seeds): score all four.
    drawn = generate(bundle, PROMPTS, 4, SamplingOptions(seed=1))
    scores = load_clip(tmp_path / "clip").cosine(drawn.images, list(drawn.prompts))
    for p in range(2):
        best = sorted(range(4), key=lambda s: -float(scores[4 * p + s]))[:2]
        records = [r for r in sidecar["images"] if r["prompt_index"] == p]
        assert [r["sample_index"] for r in records] == best
        assert [r["score"] for r in records] == pytest.approx([float(scores[4 * p + s]) for s in best], abs=1e-5)
    assert sidecar["metadata"]["candidates_per_prompt"] == 4 and sidecar["metadata"]["rerank"]["clip"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--prompts-file", "{tmp}/missing.txt"], "error: prompts file not found: {tmp}/missing.txt"),
        (
            ["--prompt", "x", "--priming-image", "{tmp}/missing.png"],
            "error: priming image not found: {tmp}/missing.png",
        ),
        (
            ["--prompt", "x", "--candidates", "3", "--num-images", "2"],
            "error: keeping 2 of 3 candidates needs --rerank",
        ),
        ([], "error: expected at least one --prompt or a --prompts-file, got none"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(checkpoint, tmp_path, capsys, extra, message):
    extra = [value.format(tmp=tmp_path) for value in extra]
    assert run("--checkpoint", str(checkpoint), *extra, "--output", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message.format(tmp=tmp_path)) and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert run("--checkpoint", str(tmp_path / "nope"), "--prompt", "x") == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'nope'}"
