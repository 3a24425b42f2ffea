from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dalle.cli_tokenizer import app
from dalle_core.errors import DataError

CAPTIONS = ["a large red circle at the top left", "a small blue square", "一只红色的猫", "Привет мир"] * 25


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n", encoding="utf-8")
    return path


def test_train_hf_bpe_prints_the_exact_vocabulary(tmp_path, corpus):
    pytest.importorskip("tokenizers")
    from dalle_tokenizers import HfTokenizer

    output = tmp_path / "tok" / "tokenizer.json"
    result = CliRunner().invoke(
        app, ["train", "--kind", "hf-bpe", "--vocab-size", "300", "--output", str(output), str(corpus)]
    )
    assert result.exit_code == 0, result.output
    vocab_size = HfTokenizer(output).vocab_size
    assert f"wrote {output}: {vocab_size} ids (asked for at most 300), padding id 0" in result.output


def test_train_yttm(tmp_path, corpus):
    pytest.importorskip("youtokentome")
    from dalle_tokenizers import YttmTokenizer

    output = tmp_path / "captions.model"
    result = CliRunner().invoke(
        app, ["train", "--kind", "yttm", "--vocab-size", "5000", "--output", str(output), str(corpus)]
    )
    assert result.exit_code == 0, result.output
    assert f"{YttmTokenizer(output).vocab_size} ids (asked for at most 5000)" in result.output


def test_unknown_kind_and_missing_corpus(tmp_path, corpus):
    result = CliRunner().invoke(
        app, ["train", "--kind", "wordpiece", "--vocab-size", "9", "--output", "x", str(corpus)]
    )
    assert result.exit_code == 2 and "wordpiece" in result.output
    missing = tmp_path / "missing.txt"
    result = CliRunner().invoke(
        app, ["train", "--vocab-size", "300", "--output", str(tmp_path / "t.json"), str(missing)]
    )
    assert isinstance(result.exception, DataError) and str(missing) in str(result.exception)


def test_importing_the_command_does_not_import_torch():
    code = "import sys, dalle.cli_tokenizer; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
