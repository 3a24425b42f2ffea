"""CLIP BPE on a synthetic vocabulary file in CLIP's format (always), and against open_clip (extra ``clip``)."""

from __future__ import annotations

import gzip

import pytest
import torch

from dalle_core import registry
from dalle_core.errors import ConfigError
from dalle_core.testing import TextTokenizerContract
from dalle_tokenizers import ClipBpeTokenizer
from dalle_tokenizers.clip_bpe import CLIP_VOCAB_SIZE, clean_caption
from dalle_tokenizers.clip_vocab import NUM_MERGES, VOCAB_FILE_NAME

# Real-looking merges first; the rest of CLIP's 48894 lines are filler pairs no caption contains.
MERGES = ["h e", "l l", "he ll", "hell o</w>", "r e", "re d</w>", "c i", "ci r", "l e</w>", "cir c", "circ le</w>"]


def write_vocabulary(path, merges=MERGES):
    filler = [f"~{index} ~" for index in range(NUM_MERGES - len(merges))]
    text = "\n".join(["#version: synthetic", *merges, *filler, "~x ~y"]) + "\n"
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    return write_vocabulary(tmp_path_factory.mktemp("clip") / VOCAB_FILE_NAME)


@pytest.fixture(scope="class", autouse=True)
def class_vocab(request, vocab_file):
    if request.cls is not None:
        request.cls.vocab_file = vocab_file


def expected_ids(tokens):
    """Ids computed from the file's layout by hand: printable bytes, then the same ending a word, then merges."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [byte for byte in range(256) if byte not in printable]
    # In id order: printable bytes by value, then the others by value; each symbol is chr(byte) or chr(256 + rank).
    symbols = [chr(byte) for byte in printable] + [chr(256 + rank) for rank in range(len(moved))]
    table = {symbol: index for index, symbol in enumerate(symbols)}
    table |= {symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)}
    table |= {merge.replace(" ", ""): 512 + rank for rank, merge in enumerate(MERGES)}
    return [table[token] for token in tokens]


class TestClipBpeContract(TextTokenizerContract):
    sample_texts = ("a large red circle at the top left", "猫が座っている", "привет мир", "😀 emoji", "x")

    def make_text_tokenizer(self):
        return ClipBpeTokenizer(self.vocab_file)

    def normalize(self, text):
        return " ".join(text.split()).lower()


class TestDallePytorchStyleContract(TestClipBpeContract):
    """No start/end of text, padding 0: DALLE-pytorch's ids."""

    def make_text_tokenizer(self):
        return ClipBpeTokenizer(self.vocab_file, add_special_tokens=False, pad_id=0)


class TestOwnPaddingIdContract(TestClipBpeContract):
    sample_texts = ("hello !! red !?", "!! x")

    def make_text_tokenizer(self):
        return ClipBpeTokenizer(self.vocab_file, add_special_tokens=False, pad_id=CLIP_VOCAB_SIZE)


def test_bpe_merges_by_rank_into_known_ids(vocab_file):
    tokenizer = ClipBpeTokenizer(vocab_file)
    ids = tokenizer.encode(["Hello RED circle, ok"], 12)[0].tolist()
    body = expected_ids(["hello</w>", "red</w>", "circle</w>", ",</w>", "o", "k</w>"])
    assert ids == [49406, *body, 49407, 0, 0, 0, 0]
    assert tokenizer.vocab_size == 49408 and tokenizer.pad_id == 0


def test_bytes_outside_printable_latin1_use_moved_symbols(vocab_file):
    # "é" is bytes C3 A9, both printable Latin-1; "€" is E2 82 AC, where 0x82 is a moved control byte.
    ids = ClipBpeTokenizer(vocab_file, add_special_tokens=False).tokenize("é€")
    # "é" is a letter and "€" a symbol: two words. 0x82 is the 37th moved byte (after 0-32 and 127-129).
    assert ids == expected_ids(["Ã", "©</w>", "â", chr(256 + 36), "¬</w>"])


def test_cleaning_is_clips():
    assert clean_caption("  Caf\u00c3\u00a9 &amp;amp;\tTEA\n ") == "café & tea"


def test_padding_id_inside_the_text_survives_decoding(vocab_file):
    # Id 0 is "!" inside a word ("!!" is "!" then "!</w>"): before end-of-text, or before trailing padding, it is text.
    tokenizer = ClipBpeTokenizer(vocab_file)
    ids = tokenizer.encode(["hello!! red!?"], 10)
    bang, bang_end, red, question_end = expected_ids(["!", "!</w>", "red</w>", "?</w>"])
    assert bang == 0
    assert ids[0].tolist() == [49406, *expected_ids(["hello</w>"]), 0, bang_end, red, 0, question_end, 49407, 0, 0]
    assert tokenizer.decode(ids) == ["hello !! red !?"]
    dallepytorch_style = ClipBpeTokenizer(vocab_file, add_special_tokens=False)
    assert dallepytorch_style.decode(dallepytorch_style.encode(["hi !! there"], 8)) == ["hi !! there"]


def test_own_padding_id_extends_the_vocabulary(vocab_file):
    tokenizer = ClipBpeTokenizer(vocab_file, pad_id=CLIP_VOCAB_SIZE)
    assert tokenizer.vocab_size == CLIP_VOCAB_SIZE + 1
    assert tokenizer.encode(["hello"], 4)[0, -1].item() == CLIP_VOCAB_SIZE
    with pytest.raises(ConfigError, match="pad_id"):
        ClipBpeTokenizer(vocab_file, pad_id=CLIP_VOCAB_SIZE + 1)


def test_saved_tokenizer_needs_no_vocabulary_outside_its_directory(tmp_path):
    original = write_vocabulary(tmp_path / "elsewhere.gz")
    tokenizer = ClipBpeTokenizer(original, add_special_tokens=False, pad_id=CLIP_VOCAB_SIZE)
    tokenizer.save(tmp_path / "tok")
    original.unlink()
    loaded = registry.load_text_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, ClipBpeTokenizer)
    assert not loaded.add_special_tokens and loaded.pad_id == CLIP_VOCAB_SIZE
    assert torch.equal(loaded.encode(["red circle"], 6), tokenizer.encode(["red circle"], 6))


def test_a_file_that_is_not_a_clip_vocabulary_is_named(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("#version\na b\n")
    with pytest.raises(ConfigError, match=r"short.txt is not a CLIP BPE vocabulary.*got 2 lines"):
        ClipBpeTokenizer(short)
    broken = write_vocabulary(tmp_path / "broken.gz", merges=["h e", "three parts here"])
    with pytest.raises(ConfigError, match=r"line 3 should be 'first second', got 'three parts here'"):
        ClipBpeTokenizer(broken)
    with pytest.raises(ConfigError, match="found no file"):
        ClipBpeTokenizer(tmp_path / "missing.gz")


def test_vocabulary_not_found_says_how_to_get_one(monkeypatch):
    import importlib.metadata
    import importlib.util

    from dalle_core.errors import MissingExtraError

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    # Pretend open-clip-torch is absent (whether or not the clip extra is installed here).
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingExtraError) as error:
        ClipBpeTokenizer()
    message = str(error.value)
    assert "dalle-tokenizers[clip]" in message and f"or pass the path of CLIP's {VOCAB_FILE_NAME}" in message
