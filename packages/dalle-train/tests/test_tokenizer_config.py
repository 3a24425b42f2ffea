from __future__ import annotations

import pytest

from dalle_core.errors import ConfigError
from dalle_tokenizers import SimpleTokenizer
from dalle_train.run import build_text_tokenizer
from dalle_train.run_config import RunConfig, TokenizerConfig


def test_saved_directory_and_kind_with_options(tmp_path):
    SimpleTokenizer(lowercase=True).save(tmp_path / "tok")
    loaded = build_text_tokenizer(RunConfig(tokenizer=TokenizerConfig(path=str(tmp_path / "tok"))))
    assert loaded.encode(["AB"], 3).tolist() == [[ord("a") + 1, ord("b") + 1, 0]]
    built = build_text_tokenizer(RunConfig(tokenizer=TokenizerConfig(kind="simple", options={"lowercase": True})))
    assert built.encode(["AB"], 3).tolist() == [[ord("a") + 1, ord("b") + 1, 0]]
    with pytest.raises(ConfigError, match="'yttm' text tokenizer needs a YouTokenToMe .model file"):
        build_text_tokenizer(RunConfig(tokenizer=TokenizerConfig(kind="yttm")))


def test_a_tokenizer_file_like_dalle_pytorch_bpe_path(tmp_path):
    pytest.importorskip("tokenizers")
    from dalle_tokenizers.training import train_bpe_from_texts

    captions = ["a red bird on a branch", "a blue bird in the sky", "two red birds"] * 20
    path = train_bpe_from_texts("hf-bpe", captions, 300, tmp_path / "tokenizer.json")
    tokenizer = build_text_tokenizer(RunConfig(tokenizer=TokenizerConfig(kind="hf", path=str(path))))
    ids = tokenizer.encode(["a red bird"], 16)
    assert tokenizer.decode(ids) == ["a red bird"]
