from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from dalle.cli import main
from dalle_transformer import native


def test_help_lists_commands_and_is_fast(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "generate" in out
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dalle", "--help"], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and "generate" in result.stdout
    # --help must not import torch; this bound is generous so a loaded machine does not flake.
    assert elapsed < 10, f"dalle --help took {elapsed:.1f} s"
    code = "import contextlib, io, sys\nfrom dalle.cli import main\n"
    code += "with contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\nprint(' '.join(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "torch" not in loaded and "dalle_core.errors" in loaded


def test_bad_flag_is_one_line(capsys):
    assert main(["demo", "--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No such option") and "--no-such-flag" in err and len(err.splitlines()) == 1


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: checkpoint not found: {tmp_path / 'nope'}"


def test_bad_override_is_one_line_before_any_work(tmp_path, capsys):
    assert main(["demo", "--set", "dalle.model.depth=deep", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == "error: model.depth: expected an integer, got 'deep'"
    assert main(["demo", "--set", "vae.vae.num_layers=0", "--output", str(tmp_path / "out")]) == 2
    assert "num_layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_demo_end_to_end_then_generate(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--output",
        str(out),
        "--vae-steps",
        "30",
        "--dalle-steps",
        "20",
        "--set",
        "samples_per_spec=2",
        "--set",
        "max_prompts=3",
        "--set",
        "images_per_prompt=2",
        "--set",
        "dalle.model.dim=32",
        "--set",
        "dalle.model.depth=1",
    ]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = metrics["shapes_checker"]["generated_heldout_captions"]
    assert set(accuracy) >= {"colour", "shape", "size", "position", "all"}
    assert metrics["shapes_checker"]["real_images"]["colour"] >= 0.95, "the checker must read real images"
    page = (out / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 3 * 2 + 1 and all((out / source).is_file() for source in sources)
    assert (out / "grid.png").is_file() and (out / "model" / "config.json").is_file()

    generated = tmp_path / "gen"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out / "model"),
                "--prompt",
                "a small red circle at the top left",
                "--num-images",
                "2",
                "--seed",
                "5",
                "--output",
                str(generated),
            ]
        )
        == 0
    )
    sidecar = json.loads((generated / "generations.json").read_text())
    assert [r["prompt"] for r in sidecar["images"]] == ["a small red circle at the top left"] * 2

    # A compiled decoding step, and decoding without the weight copies, draw the same images (the same products summed
    # in another order: float rounding could flip a draw, about once in 10^4 runs).
    for flag in ("--compile-decoding", "--no-weight-copies"):
        variant = tmp_path / f"gen{flag}"
        arguments = ["generate", "--checkpoint", str(out / "model"), "--prompt", "a small red circle at the top left"]
        arguments += ["--num-images", "2", "--seed", "5", flag, "--output", str(variant)]
        assert main(arguments) == 0
        for record in sidecar["images"]:
            assert (variant / record["file"]).read_bytes() == (generated / record["file"]).read_bytes(), flag

    # Where the decoding step's C kernels cannot be built, generate says why and runs PyTorch's operators: the same
    # images.
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "empty-cache"))
    native._default_build.cache_clear()  # this process's build, made again under the settings above
    capsys.readouterr()
    try:
        arguments = ["generate", "--checkpoint", str(out / "model"), "--prompt", "a small red circle at the top left"]
        assert main([*arguments, "--num-images", "2", "--seed", "5", "--output", str(tmp_path / "gen-sdpa")]) == 0
    finally:
        native._default_build.cache_clear()
    assert "decoding runs PyTorch's operators instead of its C kernels, slower: cannot run the C compiler" in (
        capsys.readouterr().err
    )
    for record in sidecar["images"]:
        assert (tmp_path / "gen-sdpa" / record["file"]).read_bytes() == (generated / record["file"]).read_bytes()


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "dalle")
    result = subprocess.run(
        [script, "generate", "--checkpoint", "/nonexistent", "--prompt", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: checkpoint not found: /nonexistent"
