"""Our CLIP BPE against open_clip's tokenizer, on the vocabulary file open-clip-torch ships (extra ``clip``)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from dalle_tokenizers import ClipBpeTokenizer  # noqa: E402
from dalle_tokenizers.clip_vocab import VOCAB_FILE_NAME, find_clip_vocabulary  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "A Large RED Circle at the TOP-LEFT!!",
    "  extra   spaces\tand\nnewlines  ",
    "don't you'll we've I'm she'd it's THEY'RE",
    "numbers 1234567 and 3.14159, 1st 2nd",
    "punctuation: (brackets) [square] {curly} <angle> \"quotes\" 'single' ... ?!?",
    "HTML &amp; entities &lt;b&gt; &quot;double&quot; &amp;amp;",
    "mojibake cafÃ© naÃ¯ve",
    "café naïve résumé Ångström façade",
    "一只红色的猫坐在桌子上",
    "猫が座っている、東京タワー",
    "빨간 원이 위에 있다",
    "Привет, мир! Красный круг.",
    "دائرة حمراء كبيرة",
    "लाल गोला ऊपर बाएँ",
    "ένας κόκκινος κύκλος",
    "emoji 😀👍🏽 and a flag 🇫🇷 and 👩‍🔬",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "x",
    "hashtags #dalle @user email@example.com https://example.com/path?q=1",
    "math ∑ x² ≤ ∞ and arrows → ← and ² ³ ½",
    "tabs\tand\u00a0non-breaking\u2003spaces",
    "<start_of_text> is ordinary text here",
]


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-32")


def test_vocabulary_is_found_without_importing_open_clip():
    code = (
        "import sys; from dalle_tokenizers.clip_vocab import find_clip_vocabulary; "
        "path = find_clip_vocabulary(); print(path); print('open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].endswith(f"open_clip/{VOCAB_FILE_NAME}") and out[1] == "False"


def test_ids_equal_open_clip_tokenize(reference):
    texts = TEXTS[:-1]  # the last one is a deliberate difference, tested below
    ours = ClipBpeTokenizer().encode(texts, 77)
    theirs = open_clip.tokenize(texts, context_length=77)
    for text, mine, ref in zip(texts, ours, theirs, strict=True):
        assert mine.tolist() == ref.tolist(), text
    assert ClipBpeTokenizer().vocab_size == reference.vocab_size == 49408


def test_without_special_tokens_ids_equal_open_clip_encode(reference):
    tokenizer = ClipBpeTokenizer(add_special_tokens=False)
    for text in TEXTS[:-1]:
        assert tokenizer.tokenize(text) == reference.encode(text), text


def test_decode_equals_open_clip_decode_up_to_spacing(reference):
    tokenizer = ClipBpeTokenizer()
    ids = tokenizer.encode(TEXTS[:-1], 77)
    for text, row in zip(TEXTS[:-1], tokenizer.decode(ids), strict=True):
        expected = reference.decode(tokenizer.tokenize(text)[1:-1]).strip()
        assert row == expected.replace("\ufffd", "")


def test_deliberate_differences(reference):
    tokenizer = ClipBpeTokenizer()
    # An empty caption is all padding (open_clip: start and end of text).
    assert tokenizer.encode([""], 8).tolist() == [[0] * 8]
    assert open_clip.tokenize([""], context_length=8).tolist() == [[49406, 49407, 0, 0, 0, 0, 0, 0]]
    # Special-token text inside a caption is ordinary text.
    ours = tokenizer.tokenize(TEXTS[-1])
    assert ours.count(49406) == 1 and ours[0] == 49406
    # Truncation keeps a prefix; open_clip puts end-of-text in the last slot.
    long_text = TEXTS[0] * 20
    truncated = tokenizer.encode([long_text], 10, truncate=True)[0]
    reference_row = open_clip.tokenize([long_text], context_length=10)[0]
    assert torch.equal(truncated[:9], reference_row[:9]) and reference_row[9] == 49407 and truncated[9] != 49407


def test_found_file_is_the_default_vocabulary():
    assert find_clip_vocabulary().name == VOCAB_FILE_NAME
    assert ClipBpeTokenizer().vocab_path == find_clip_vocabulary()
