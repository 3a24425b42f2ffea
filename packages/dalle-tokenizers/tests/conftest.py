from __future__ import annotations

import pytest

# Captions in several scripts: training corpora for the tiny BPE/WordPiece/Unigram models the tests build.
CAPTIONS = (
    "a large red circle at the top left",
    "a small blue square at the bottom right",
    "a green triangle in the middle",
    "two yellow stars next to a purple hexagon",
    "一只红色的猫坐在桌子上",
    "蓝色的方块在左上角",
    "大的绿色三角形在中间",
    "Привет мир красный круг",
    "猫が座っている",
    "빨간 원이 위에 있다",
    "دائرة حمراء كبيرة",
    "लाल गोला ऊपर बाएँ",
    "ένας κόκκινος κύκλος",
    "😀 a smiling face emoji",
)


@pytest.fixture(scope="session")
def captions():
    return CAPTIONS


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "captions.txt"
    path.write_text("\n".join(CAPTIONS * 20) + "\n", encoding="utf-8")
    return path
