from __future__ import annotations

import pytest
import torch

from dalle_core.errors import ConfigError, ShapeError, TextTooLongError, VocabularyError
from dalle_tokenizers.fixed_length import pack_rows, rows_to_decode, strip_trailing
from dalle_tokenizers.padding import choose_pad_id, vocab_size_with_padding


def words_as_ids(texts):
    return [[len(word) for word in text.split()] for text in texts]


def test_rows_are_ids_then_padding():
    rows = pack_rows(["ab cde", "", "f"], words_as_ids, 4, pad_id=9, truncate=False)
    assert rows.dtype == torch.int64
    assert rows.tolist() == [[2, 3, 9, 9], [9, 9, 9, 9], [1, 9, 9, 9]]


def test_too_long_names_length_and_limit_unless_truncated():
    with pytest.raises(TextTooLongError, match=r"is 5 tokens long, more than the context length 3") as error:
        pack_rows(["a b c d e"], words_as_ids, 3, pad_id=0, truncate=False)
    assert len(str(error.value).splitlines()) == 1
    assert pack_rows(["a bb ccc dddd e"], words_as_ids, 3, pad_id=0, truncate=True).tolist() == [[1, 2, 3]]
    # Exactly the context length fits, with no padding.
    assert pack_rows(["a b c"], words_as_ids, 3, pad_id=0, truncate=False).tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_context_length_must_be_a_positive_integer(bad):
    with pytest.raises(ShapeError, match="context_length"):
        pack_rows(["a"], words_as_ids, bad, pad_id=0, truncate=False)


def test_single_string_is_rejected():
    with pytest.raises(TypeError, match="single str"):
        pack_rows("abc", words_as_ids, 4, pad_id=0, truncate=False)


def test_decode_checks_shape_dtype_and_range():
    assert rows_to_decode(torch.tensor([[1, 2], [3, 0]]), 4) == [[1, 2], [3, 0]]
    with pytest.raises(ShapeError, match=r"\[n, length\]"):
        rows_to_decode(torch.tensor([1, 2]), 4)
    with pytest.raises(ShapeError, match="dtype"):
        rows_to_decode(torch.tensor([[1.0]]), 4)
    with pytest.raises(VocabularyError, match=r"token id 4 is outside the text vocabulary \[0, 4\)"):
        rows_to_decode(torch.tensor([[1, 4]]), 4)
    with pytest.raises(VocabularyError, match="-1"):
        rows_to_decode(torch.tensor([[-1, 0]]), 4)


def test_strip_trailing_keeps_pad_ids_inside_the_text():
    assert strip_trailing([5, 0, 6, 0, 0], 0) == [5, 0, 6]
    assert strip_trailing([0, 0], 0) == []


def test_pad_id_choice_and_exact_vocabulary():
    assert choose_pad_id(100, found=3, requested=None) == 3
    assert choose_pad_id(100, found=None, requested=None) == 100  # a new id of its own
    assert choose_pad_id(100, found=3, requested=7) == 7
    assert vocab_size_with_padding(100, 3) == 100
    assert vocab_size_with_padding(100, 100) == 101
    with pytest.raises(ConfigError, match=r"pad_id: expected an integer in \[0, 100\].*got 101"):
        choose_pad_id(100, found=None, requested=101)
