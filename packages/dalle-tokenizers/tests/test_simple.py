from __future__ import annotations

import pytest
import torch

from dalle_core import registry
from dalle_core.testing import TextTokenizerContract
from dalle_tokenizers import SimpleTokenizer


class TestSimpleTokenizerContract(TextTokenizerContract):
    sample_texts = ("a large red circle at the top left", "猫が座っている", "Привет, мир", "😀 emoji", "x")

    def make_text_tokenizer(self):
        return SimpleTokenizer()


class TestLowercaseContract(TextTokenizerContract):
    sample_texts = ("A Large  RED circle", "ÉCOLE d'été")

    def make_text_tokenizer(self):
        return SimpleTokenizer(lowercase=True)

    def normalize(self, text):
        return " ".join(text.split()).lower()


def test_ids_are_utf8_bytes_plus_one():
    tokenizer = SimpleTokenizer()
    ids = tokenizer.encode(["aé"], 5)
    assert ids.tolist() == [[ord("a") + 1, 0xC3 + 1, 0xA9 + 1, 0, 0]]
    assert tokenizer.vocab_size == 257 and tokenizer.pad_id == 0


def test_truncation_inside_a_character_drops_only_the_broken_tail():
    tokenizer = SimpleTokenizer()
    ids = tokenizer.encode(["ab猫"], 3, truncate=True)
    assert tokenizer.decode(ids) == ["ab"]


def test_error_names_length_and_limit():
    with pytest.raises(Exception, match=r"is 11 tokens long, more than the context length 10"):
        SimpleTokenizer().encode(["hello world"], 10)


def test_single_string_is_rejected():
    with pytest.raises(TypeError, match="single str"):
        SimpleTokenizer().encode("hello", 8)  # type: ignore[arg-type]


def test_found_through_entry_point(tmp_path):
    assert "simple" in registry.available(registry.TEXT_TOKENIZERS)
    SimpleTokenizer(lowercase=True).save(tmp_path / "tok")
    loaded = registry.load_text_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, SimpleTokenizer) and loaded.lowercase
    assert torch.equal(loaded.encode(["HI"], 4), torch.tensor([[ord("h") + 1, ord("i") + 1, 0, 0]]))


class TestNonLatinScriptsContract(TextTokenizerContract):
    # Arabic (right to left), Devanagari and Thai (combining marks), Hangul, Greek, Han, a ZWJ emoji sequence.
    sample_texts = (
        "دائرة حمراء",
        "लाल गोला ऊपर",
        "วงกลมสีแดง",
        "빨간 원",
        "κόκκινος κύκλος",
        "红色的猫",
        "👩‍🔬 at work",
    )
    context_length = 64

    def make_text_tokenizer(self):
        return SimpleTokenizer()


@pytest.mark.parametrize("text", ["दाएँ", "วงกลม", "ÉCOLE", "e\u0301", "👩‍🔬"])
def test_ids_of_any_script_are_its_utf8_bytes(text):
    ids = SimpleTokenizer().encode([text], 32)[0]
    expected = [byte + 1 for byte in text.encode("utf-8")]
    assert ids[: len(expected)].tolist() == expected and bool((ids[len(expected) :] == 0).all())


def test_lowercase_handles_non_latin_case():
    tokenizer = SimpleTokenizer(lowercase=True)
    assert tokenizer.decode(tokenizer.encode(["ΚΎΚΛΟΣ Привет"], 40)) == ["κύκλος привет"]


def test_decode_rejects_ids_outside_the_vocabulary():
    from dalle_core.errors import VocabularyError

    with pytest.raises(VocabularyError, match="257"):
        SimpleTokenizer().decode(torch.tensor([[5, 257]]))


def test_spec_with_a_wrong_field_names_it(tmp_path):
    from dalle_core.errors import CheckpointError

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spec.json").write_text('{"kind": "simple", "lowercase": "yes"}')
    with pytest.raises(CheckpointError, match="lowercase: expected true or false"):
        registry.load_text_tokenizer(tmp_path / "tok")
