"""``dalle train`` end to end on the tiny-cpu recipe, and its one-line errors."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

from dalle.cli_train import train

TINY = [
    "--config",
    "tiny-cpu",
    "--set",
    "data.shapes.samples_per_spec=1",
    "--set",
    "vae.loop.steps=4",
    "--set",
    "vae.loop.batch_size=8",
    "--set",
    "vae.loop.sample_every=4",
    "--set",
    "dalle.loop.steps=4",
    "--set",
    "dalle.loop.batch_size=8",
    "--set",
    "dalle.loop.sample_every=4",
    "--set",
    "dalle.model.dim=16",
    "--set",
    "dalle.model.depth=1",
    "--set",
    "dalle.sample_prompts=[a red circle]",
    "--set",
    "logging.progress=false",
]


def cli() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(train)
    return app


def test_train_runs_a_recipe_resumes_and_writes_a_generation_bundle(tmp_path, monkeypatch):
    from dalle_train.bundle import load_bundle
    from dalle_transformer import native

    runner = CliRunner()
    result = runner.invoke(cli(), [*TINY, "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"model: {tmp_path / 'run' / 'model'}" in result.output
    bundle = load_bundle(tmp_path / "run" / "model")
    assert bundle.model.config.text_seq_len == 48 and bundle.image_tokenizer.num_tokens == 64
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "dalle" / "samples" / "dalle-step-000004.png").is_file()

    # Resumed where the C kernels cannot be built: training says why, and goes on with PyTorch's operators.
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DALLE_CACHE_DIR", str(tmp_path / "empty-cache"))
    native._default_build.cache_clear()  # this process's build, made again under the settings above
    try:
        again = runner.invoke(cli(), [*TINY, "--set", "dalle.loop.steps=6", "--output", str(tmp_path / "run")])
    finally:
        native._default_build.cache_clear()
    assert again.exit_code == 0, again.output
    if sys.platform.startswith("linux"):
        note = "training runs PyTorch's operators instead of its C kernels, slower: cannot run the C compiler"
        assert note in " ".join(again.output.split())  # the console wraps its lines
    from dalle_train.checkpoints import list_checkpoints

    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "dalle")][-1] == 6
    logged = (tmp_path / "run" / "dalle" / "metrics.jsonl").read_text()
    assert '"step": 6,' in logged


def test_dry_run_and_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli(), [*TINY, "--dry-run", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0 and result.output.rstrip().endswith("config OK")
    assert "samples_per_spec: 1" in result.output and not (tmp_path / "run").exists()

    from dalle_core.errors import ConfigError

    bad = runner.invoke(cli(), ["--config", "tiny-cpu", "--set", "dalle.loop.batch_size=x", "--output", str(tmp_path)])
    assert isinstance(bad.exception, ConfigError)
    assert str(bad.exception) == "dalle.loop.batch_size: expected an integer, got 'x'"


def test_importing_the_command_does_not_import_torch():
    modules = subprocess.run(
        [sys.executable, "-c", "import sys, dalle.cli_train; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "torch" not in modules and "dalle_train" not in modules
