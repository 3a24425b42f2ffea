"""Hugging Face tokenizer.json files of each model type, trained here on a tiny corpus (extra ``hf``)."""

from __future__ import annotations

import json

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from dalle_core import registry  # noqa: E402
from dalle_core.errors import ConfigError  # noqa: E402
from dalle_core.testing import TextTokenizerContract  # noqa: E402
from dalle_tokenizers import HfTokenizer  # noqa: E402


def byte_level_bpe(corpus: list[str]) -> tokenizers.Tokenizer:
    """GPT-2 style: lossless for every script; no pad token."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer.show_progress = False
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def chinese_wordpiece(corpus: list[str]) -> tokenizers.Tokenizer:
    """BERT style: each Han character its own word, [CLS] text [SEP], a [PAD] token."""
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    trainer.show_progress = False
    tokenizer.train_from_iterator(corpus, trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer


def unigram(corpus: list[str]) -> tokenizers.Tokenizer:
    """SentencePiece style, with padding switched on in the file (which we must override)."""
    tokenizer = tokenizers.Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "<pad>"], unk_token="<unk>")
    trainer.show_progress = False
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("<pad>"), pad_token="<pad>", length=50)
    tokenizer.enable_truncation(max_length=50)
    return tokenizer


BUILDERS = {"bpe": byte_level_bpe, "wordpiece": chinese_wordpiece, "unigram": unigram}


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory, captions):
    directory = tmp_path_factory.mktemp("hf")
    paths = {}
    for name, build in BUILDERS.items():
        paths[name] = directory / f"{name}.json"
        build(list(captions) * 10).save(str(paths[name]))
    return paths


@pytest.fixture(scope="class", autouse=True)
def class_files(request, tokenizer_files):
    if request.cls is not None:
        request.cls.files = tokenizer_files


def han_spaced(text: str) -> str:
    """How BERT-style decoding spaces text: every Han character a word of its own."""
    spaced = "".join(f" {char} " if "\u4e00" <= char <= "\u9fff" else char for char in text)
    return " ".join(spaced.split())


class TestByteLevelBpeContract(TextTokenizerContract):
    sample_texts = ("a large red circle at the top left", "Привет мир", "猫が座っている", "😀 unseen émoji", "x")

    def make_text_tokenizer(self):
        return HfTokenizer(self.files["bpe"])


class TestChineseWordPieceContract(TextTokenizerContract):
    sample_texts = ("一只红色的猫", "蓝色的方块在左上角", "a red circle")

    def make_text_tokenizer(self):
        return HfTokenizer(self.files["wordpiece"])

    def normalize(self, text):
        return han_spaced(text)


class TestUnigramContract(TextTokenizerContract):
    sample_texts = ("a large red circle at the top left", "빨간 원이 위에 있다", "x")

    def make_text_tokenizer(self):
        return HfTokenizer(self.files["unigram"])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ids_are_the_files_own_ids(tokenizer_files, name):
    reference = tokenizers.Tokenizer.from_file(str(tokenizer_files[name]))
    reference.no_padding()
    reference.no_truncation()
    tokenizer = HfTokenizer(tokenizer_files[name])
    for text in ("a red circle", "一只红色的猫", "Привет мир"):
        expected = reference.encode(text).ids
        row = tokenizer.encode([text], 40)[0].tolist()
        assert row == expected + [tokenizer.pad_id] * (40 - len(expected))


def test_pad_id_and_exact_vocabulary_size(tokenizer_files):
    bpe = HfTokenizer(tokenizer_files["bpe"])  # no pad token: a new id past the vocabulary
    base = tokenizers.Tokenizer.from_file(str(tokenizer_files["bpe"])).get_vocab_size()
    assert bpe.pad_id == base and bpe.vocab_size == base + 1
    assert bpe.encode(["a"], 3)[0].tolist()[1:] == [base, base]

    wordpiece = HfTokenizer(tokenizer_files["wordpiece"])  # a token named [PAD]
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_files["wordpiece"]))
    assert wordpiece.pad_id == raw.token_to_id("[PAD]") and wordpiece.vocab_size == raw.get_vocab_size()

    unigram = HfTokenizer(tokenizer_files["unigram"])  # pad id from the file's padding settings
    assert unigram.pad_id == tokenizers.Tokenizer.from_file(str(tokenizer_files["unigram"])).padding["pad_id"]
    assert unigram.vocab_size == len(json.loads(tokenizer_files["unigram"].read_text())["model"]["vocab"])

    explicit = HfTokenizer(tokenizer_files["bpe"], pad_id=0)
    assert explicit.pad_id == 0 and explicit.vocab_size == base
    with pytest.raises(ConfigError, match="pad_id"):
        HfTokenizer(tokenizer_files["bpe"], pad_id=base + 1)


def test_special_tokens_follow_the_file_or_can_be_left_out(tokenizer_files):
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_files["wordpiece"]))
    cls_id, sep_id = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
    with_special = HfTokenizer(tokenizer_files["wordpiece"]).tokenize("红色的猫")
    without = HfTokenizer(tokenizer_files["wordpiece"], add_special_tokens=False).tokenize("红色的猫")
    assert with_special == [cls_id, *without, sep_id] and len(without) == 4


def test_save_load_keeps_options(tmp_path, tokenizer_files):
    tokenizer = HfTokenizer(tokenizer_files["wordpiece"], add_special_tokens=False, pad_id=0)
    tokenizer.save(tmp_path / "tok")
    loaded = registry.load_text_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, HfTokenizer) and not loaded.add_special_tokens and loaded.pad_id == 0
    assert torch.equal(loaded.encode(["红色的猫"], 8), tokenizer.encode(["红色的猫"], 8))
    assert HfTokenizer(tmp_path / "tok").vocab_size == tokenizer.vocab_size  # a directory holding tokenizer.json


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="found no file"):
        HfTokenizer(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model": "nonsense"}')
    with pytest.raises(ConfigError, match=r"broken.json is not a Hugging Face tokenizer.json"):
        HfTokenizer(broken)
