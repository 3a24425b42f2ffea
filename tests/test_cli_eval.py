"""`dalle eval` and `dalle clip train`, mounted on a fresh Typer app exactly as the root CLI mounts them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
import typer
from typer.testing import CliRunner

from dalle import cli_eval


@pytest.fixture
def app() -> typer.Typer:
    root = typer.Typer()
    cli_eval.register(root)
    return root


@pytest.fixture
def checkpoint(tmp_path):
    from dalle_tokenizers import SimpleTokenizer
    from dalle_train.bundle import save_bundle
    from dalle_transformer import DALLE, DALLEConfig
    from dalle_vae import DiscreteVAE, DiscreteVAEConfig

    torch.manual_seed(0)
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=32, num_layers=3, num_tokens=16, codebook_dim=8, hidden_dim=8))
    config = DALLEConfig(
        num_text_tokens=257,
        text_seq_len=48,
        num_image_tokens=16,
        image_fmap_size=4,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
    )
    save_bundle(tmp_path / "model", DALLE(config), SimpleTokenizer(), vae.eval())
    return tmp_path / "model"


def test_importing_the_commands_does_not_import_torch():
    code = "import sys\nimport dalle.cli_eval\nprint('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_eval_writes_a_report(app, checkpoint, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle at the top left\n\na small blue square in the center\n")
    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "report"),
        "--prompts-file",
        str(prompts),
    ]
    result = CliRunner().invoke(app, [*args, "--images-per-prompt", "2", "--seed", "3", "--top-k", "4"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "checker colour" in result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["counts"] == {"prompts": 2, "candidates_per_prompt": 2, "kept_per_prompt": 2}
    assert metrics["sampling"]["seed"] == 3 and metrics["sampling"]["top_k"] == 4
    assert {"shapes_checker", "vae", "dalle_heldout"} <= set(metrics)
    assert (tmp_path / "report" / "index.html").is_file() and len(list((tmp_path / "report" / "images").iterdir())) == 4


def test_eval_refuses_reranking_without_clip(app, checkpoint, tmp_path):
    from dalle_core.errors import ConfigError

    args = ["eval", "--checkpoint", str(checkpoint), "--candidates", "4", "--images-per-prompt", "2"]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError) and "needs a CLIP model" in str(result.exception)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs dalle-eval[clip]")
def test_clip_train_then_rerank(app, checkpoint, tmp_path):
    args = ["clip", "train", "--output", str(tmp_path / "clip"), "--steps", "3", "--batch-size", "8"]
    result = CliRunner().invoke(app, [*args, "--samples-per-spec", "1", "--set", "width=32"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "clip" / "clip_train_config.json").read_text())["width"] == 32
    args = [
        "eval",
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(tmp_path / "r"),
        "--clip-model",
        str(tmp_path / "clip"),
    ]
    result = CliRunner().invoke(app, [*args, "--candidates", "3", "--images-per-prompt", "1", "--max-prompts", "2"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["clip"]["reranked"] is True
    assert metrics["clip"]["clip_score"] >= metrics["clip"]["clip_score_all_candidates"]  # the best of 3 is kept


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_clip_train_without_the_extra_names_it(app, tmp_path):
    result = CliRunner().invoke(app, ["clip", "train", "--output", str(tmp_path / "clip"), "--steps", "1"])
    assert "dalle-eval[clip]" in str(result.exception)
