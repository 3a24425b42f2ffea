"""The CLIP BPE vocabulary file: where to find it, and how it turns into CLIP's 49408 ids.

The file (``bpe_simple_vocab_16e6.txt.gz``, shipped inside the ``open-clip-torch`` wheel) is a header line and then
one merge per line, ``"first second"``, most frequent first. CLIP uses the first 48894 merges. Its ids are: the 256
byte symbols, the same 256 symbols ending a word (``"</w>"``), one id per merge in order, then start and end of text.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

from dalle_core.errors import ConfigError, MissingExtraError

VOCAB_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"


class ClipVocabularyNotFoundError(MissingExtraError):
    """Neither a vocabulary path was given nor is ``open-clip-torch`` (which ships the file) installed."""

    def __init__(self) -> None:
        super().__init__("open_clip", "clip", "dalle-tokenizers")
        message = f"{self.args[0]}; or pass the path of CLIP's {VOCAB_FILE_NAME} as vocab_path"
        self.args = (message,)
        self.msg = message  # ImportError prints ``msg``, not ``args``


def byte_symbols() -> list[str]:
    """One printable character per byte value, so that BPE works on text with no whitespace or control characters.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space, a few more) are moved, in
    order, to the characters from U+0100 on. The list is in byte order; CLIP's first 256 ids follow this list's order
    with the printable bytes first, see :func:`clip_vocabulary`.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    moved = 0
    for byte in range(256):
        if byte not in kept:
            symbols[byte] = chr(256 + moved)
            moved += 1
    return [symbols[byte] for byte in range(256)]


def _id_order_of_bytes() -> list[int]:
    """Byte values in the order of CLIP's first 256 ids: the printable ones ascending, then the moved ones."""
    symbols = byte_symbols()
    return sorted(range(256), key=lambda byte: (ord(symbols[byte]) >= 256, ord(symbols[byte])))


def find_clip_vocabulary() -> Path:
    """The vocabulary file inside the installed ``open-clip-torch``, located without importing ``open_clip``."""
    candidates = []
    try:
        distribution = importlib.metadata.distribution("open-clip-torch")
        candidates.append(Path(str(distribution.locate_file(f"open_clip/{VOCAB_FILE_NAME}"))))
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("open_clip")  # a top-level package: found, not executed
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / VOCAB_FILE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ClipVocabularyNotFoundError()


def read_merges(path: Path) -> list[tuple[str, str]]:
    """CLIP's merges from ``path`` (gzip-compressed or plain text)."""
    if not path.is_file():
        raise ConfigError(f"vocab_path: expected CLIP's {VOCAB_FILE_NAME}, found no file at {path}")
    raw = path.read_bytes()
    try:
        text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"vocab_path: {path} is not a gzip or UTF-8 text file ({error})") from None
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    if len(lines) < NUM_MERGES:
        raise ConfigError(
            f"vocab_path: {path} is not a CLIP BPE vocabulary: expected a header and at least {NUM_MERGES} merges, "
            f"got {len(lines)} lines"
        )
    merges = []
    for number, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(
                f"vocab_path: {path} is not a CLIP BPE vocabulary: line {number} should be 'first second', "
                f"got {line[:40]!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


def clip_vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    """The token string of each of CLIP's 49408 ids, in id order."""
    symbols = byte_symbols()
    bytes_in_id_order = [symbols[byte] for byte in _id_order_of_bytes()]
    return [
        *bytes_in_id_order,
        *(symbol + END_OF_WORD for symbol in bytes_in_id_order),
        *(first + second for first, second in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]
