"""BPE training: the written files load as tokenizers, with the exact vocabulary they learned."""

from __future__ import annotations

import pytest
import torch

from dalle_core.errors import ConfigError, DataError
from dalle_tokenizers import build_text_tokenizer, train_bpe, train_bpe_from_texts


def test_arguments_are_checked_before_any_work(tmp_path, corpus_file):
    with pytest.raises(ConfigError, match=r"kind: expected one of \['hf-bpe', 'yttm'\], got 'wordpiece'"):
        train_bpe("wordpiece", [corpus_file], 300, tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="vocab_size: expected a positive integer, got 0"):
        train_bpe("yttm", [corpus_file], 0, tmp_path / "x")
    with pytest.raises(ConfigError, match="at least 257 ids"):
        train_bpe("hf-bpe", [corpus_file], 100, tmp_path / "x")
    with pytest.raises(DataError, match="corpus file not found: .*missing.txt"):
        train_bpe("hf-bpe", [corpus_file, tmp_path / "missing.txt"], 300, tmp_path / "x")
    with pytest.raises(DataError, match="at least one corpus file"):
        train_bpe("hf-bpe", [], 300, tmp_path / "x")
    with pytest.raises(DataError, match="no text"):
        train_bpe_from_texts("hf-bpe", ["", "  \n "], 300, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_hf_bpe_is_byte_level_and_exact(tmp_path, corpus_file, captions):
    pytest.importorskip("tokenizers")
    output = train_bpe("hf-bpe", [corpus_file], 400, tmp_path / "bpe" / "tokenizer.json")
    assert output == tmp_path / "bpe" / "tokenizer.json" and output.is_file()
    tokenizer = build_text_tokenizer("hf", output)
    assert tokenizer.pad_id == 0  # "<pad>" is the first token
    assert 257 < tokenizer.vocab_size <= 400
    # Every byte is in the alphabet: scripts never seen in training round-trip exactly.
    unseen = ["ქართული ანბანი", "ᚠᚢᚦᚨᚱᚲ", "🦄 unicorn"]
    assert tokenizer.decode(tokenizer.encode(unseen, 64)) == unseen
    # Merges were learned: a training caption takes fewer ids than its UTF-8 bytes.
    assert len(tokenizer.tokenize(captions[0])) <= len(captions[0].encode("utf-8")) / 2


def test_files_and_texts_train_the_same_tokenizer(tmp_path, corpus_file):
    pytest.importorskip("tokenizers")
    from_files = train_bpe("hf-bpe", [corpus_file], 300, tmp_path / "a.json")
    lines = corpus_file.read_text(encoding="utf-8").splitlines()
    from_texts = train_bpe_from_texts("hf-bpe", iter(lines), 300, tmp_path / "b.json")
    texts = ["a large red circle", "一只红色的猫"]
    first, second = build_text_tokenizer("hf", from_files), build_text_tokenizer("hf", from_texts)
    assert torch.equal(first.encode(texts, 32), second.encode(texts, 32))


def test_yttm_learns_fewer_tokens_than_asked_and_reports_them(tmp_path, corpus_file):
    youtokentome = pytest.importorskip("youtokentome")
    output = train_bpe("yttm", [corpus_file, corpus_file], 100_000, tmp_path / "captions.model")
    tokenizer = build_text_tokenizer("yttm", output)
    assert tokenizer.vocab_size == len(youtokentome.BPE(str(output)).vocab()) < 100_000
    assert tokenizer.pad_id == 0
    with pytest.raises(ConfigError, match=r"vocab_size: .*too small"):
        train_bpe("yttm", [corpus_file], 10, tmp_path / "small.model")
