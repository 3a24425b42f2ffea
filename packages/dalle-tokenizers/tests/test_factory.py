from __future__ import annotations

import sys

import pytest

from dalle_core.errors import ConfigError, MissingExtraError, RegistryError
from dalle_tokenizers import SimpleTokenizer, build_text_tokenizer
from dalle_tokenizers.hf import read_tokenizer_file


def test_simple_with_options():
    tokenizer = build_text_tokenizer("simple", lowercase=True)
    assert isinstance(tokenizer, SimpleTokenizer) and tokenizer.lowercase


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="path: a 'hf' text tokenizer needs a tokenizer.json, got none"):
        build_text_tokenizer("hf")
    with pytest.raises(ConfigError, match="needs a YouTokenToMe .model file"):
        build_text_tokenizer("yttm")
    with pytest.raises(ConfigError, match="'simple' text tokenizer takes no file"):
        build_text_tokenizer("simple", tmp_path)
    with pytest.raises(ConfigError, match="simple text tokenizer: .*no_such_option"):
        build_text_tokenizer("simple", no_such_option=1)
    with pytest.raises(RegistryError, match="no dalle.text_tokenizers entry named 'sentencepiece'"):
        build_text_tokenizer("sentencepiece")


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if the hf extra were not installed
    with pytest.raises(MissingExtraError, match=r"uv pip install 'dalle-tokenizers\[hf\]'"):
        read_tokenizer_file(tmp_path / "tokenizer.json")
