"""YouTokenToMe models trained here on a tiny corpus (extra ``yttm``)."""

from __future__ import annotations

import pytest
import torch

youtokentome = pytest.importorskip("youtokentome")

from dalle_core import registry  # noqa: E402
from dalle_core.errors import ConfigError  # noqa: E402
from dalle_core.testing import TextTokenizerContract  # noqa: E402
from dalle_tokenizers import YttmTokenizer, train_bpe  # noqa: E402


@pytest.fixture(scope="session")
def model_file(tmp_path_factory, corpus_file):
    # Far more than this corpus can give: YouTokenToMe stops when no pair is left to merge.
    return train_bpe("yttm", [corpus_file], 5000, tmp_path_factory.mktemp("yttm") / "captions.model")


@pytest.fixture(scope="session")
def model_without_pad(tmp_path_factory, corpus_file):
    path = tmp_path_factory.mktemp("yttm") / "nopad.model"
    youtokentome.BPE.train(
        data=str(corpus_file), model=str(path), vocab_size=200, pad_id=-1, unk_id=0, bos_id=1, eos_id=2
    )
    return path


@pytest.fixture(scope="class", autouse=True)
def class_model(request, model_file):
    if request.cls is not None:
        request.cls.model_file = model_file


class TestYttmContract(TextTokenizerContract):
    sample_texts = ("a large red circle at the top left", "一只红色的猫", "Привет мир", "😀 a smiling face emoji", "x")

    def make_text_tokenizer(self):
        return YttmTokenizer(self.model_file)


def test_vocab_size_is_what_was_learned_not_what_was_asked(model_file):
    tokenizer = YttmTokenizer(model_file)
    learned = youtokentome.BPE(str(model_file)).vocab()
    assert tokenizer.vocab_size == len(learned) < 5000
    ids = tokenizer.encode(["a large red circle", "蓝色的方块在左上角", "ένας κόκκινος κύκλος"], 32)
    assert int(ids.max()) < tokenizer.vocab_size


def test_ids_are_youtokentomes_and_padding_is_zero(model_file):
    tokenizer = YttmTokenizer(model_file)
    reference = youtokentome.BPE(str(model_file))
    assert tokenizer.pad_id == 0 == reference.subword_to_id("<PAD>")
    text = "a small blue square 猫"
    expected = reference.encode([text], output_type=youtokentome.OutputType.ID)[0]
    assert tokenizer.encode([text], 30)[0].tolist() == expected + [0] * (30 - len(expected))


def test_decode_drops_padding_bos_and_eos(model_file):
    tokenizer = YttmTokenizer(model_file)
    reference = youtokentome.BPE(str(model_file))
    bos, eos = reference.subword_to_id("<BOS>"), reference.subword_to_id("<EOS>")
    body = reference.encode(["a red circle"], output_type=youtokentome.OutputType.ID)[0]
    row = torch.tensor([[bos, *body, eos, 0, 0, 0]])
    assert tokenizer.decode(row) == ["a red circle"]
    assert reference.decode(row.tolist())[0] != "a red circle"  # YouTokenToMe alone keeps them


def test_model_without_pad_token_gets_a_new_pad_id(model_without_pad, tmp_path):
    base = len(youtokentome.BPE(str(model_without_pad)).vocab())
    tokenizer = YttmTokenizer(model_without_pad)
    assert tokenizer.pad_id == base and tokenizer.vocab_size == base + 1
    ids = tokenizer.encode(["a red circle"], 20)
    assert ids[0, -1].item() == base and tokenizer.decode(ids) == ["a red circle"]
    tokenizer.save(tmp_path / "tok")
    loaded = registry.load_text_tokenizer(tmp_path / "tok")
    assert loaded.pad_id == base and torch.equal(loaded.encode(["a red circle"], 20), ids)


def test_bad_model_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="found no file"):
        YttmTokenizer(tmp_path / "missing.model")
    broken = tmp_path / "broken.model"
    broken.write_text("not a model")
    with pytest.raises(ConfigError, match=r"broken.model is not a YouTokenToMe model"):
        YttmTokenizer(broken)
    for text in ("2 1\n97 4\n98 5\n1 0 2 3\n", "1 0\n97 4\n", "1 0\n97 4 9\n1 0 2 3\n", "\xff\xfe"):
        broken.write_bytes(text.encode("latin-1"))
        with pytest.raises(ConfigError, match="is not a YouTokenToMe model"):
            YttmTokenizer(broken)


def test_the_format_check_accepts_a_real_model(model_file):
    from dalle_tokenizers.yttm import check_model_format

    check_model_format(model_file)
