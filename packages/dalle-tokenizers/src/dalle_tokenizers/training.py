"""Training a BPE on captions, writing a file that ``build_text_tokenizer`` (and the CLI) accept.

- ``"hf-bpe"``: a byte-level BPE with the ``tokenizers`` package (extra ``hf``), saved as a ``tokenizer.json`` for
  kind ``"hf"``. Every byte is in its alphabet, so any script encodes without unknown tokens; ``<pad>`` is id 0.
- ``"yttm"``: a YouTokenToMe model (extra ``yttm``) for kind ``"yttm"``, as DALLE-pytorch's ``--bpe_path`` used;
  ``<PAD>`` is id 0. Characters it never saw become ``<UNK>``.

Either may learn fewer tokens than ``vocab_size`` asks (a small corpus has few merges to make): build the tokenizer
from the written file and read its ``vocab_size`` for the transformer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal, get_args

from dalle_core.errors import ConfigError, DataError
from dalle_core.extras import require_extra

BpeKind = Literal["hf-bpe", "yttm"]
BPE_KINDS: tuple[str, ...] = get_args(BpeKind)
HF_PAD_TOKEN = "<pad>"
# 256 byte symbols and the padding token: the smallest byte-level vocabulary.
HF_MIN_VOCAB_SIZE = 257


def train_bpe(kind: BpeKind, files: Sequence[Path], vocab_size: int, output: Path) -> Path:
    """Train a BPE of ``kind`` on text files (one caption per line) and write it to ``output``; returns ``output``."""
    paths = [Path(file) for file in files]
    if not paths:
        raise DataError("expected at least one corpus file, got none")
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise DataError(f"corpus file not found: {missing[0]}")
    return train_bpe_from_texts(kind, _lines_of(paths), vocab_size, output)


def train_bpe_from_texts(kind: BpeKind, texts: Iterable[str], vocab_size: int, output: Path) -> Path:
    """Train a BPE of ``kind`` on captions and write it to ``output``; returns ``output``."""
    _check_arguments(kind, vocab_size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Write next to ``output`` and rename, so a failed run never leaves half a tokenizer under the final name.
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent) as scratch:
        corpus = Path(scratch) / "corpus.txt"
        if _write_corpus(texts, corpus) == 0:
            raise DataError("the corpus has no text: expected at least one non-empty caption")
        staged = Path(scratch) / output.name
        if kind == "hf-bpe":
            _train_hf_bpe(corpus, vocab_size, staged)
        else:
            _train_yttm(corpus, vocab_size, staged)
        os.replace(staged, output)
    return output


def _check_arguments(kind: str, vocab_size: int) -> None:
    if kind not in BPE_KINDS:
        raise ConfigError(f"kind: expected one of {list(BPE_KINDS)}, got {kind!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    if kind == "hf-bpe" and vocab_size < HF_MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size: a byte-level BPE needs at least {HF_MIN_VOCAB_SIZE} ids (256 bytes and padding), "
            f"got {vocab_size}"
        )


def _lines_of(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        with path.open(encoding="utf-8") as lines:
            yield from lines


def _write_corpus(texts: Iterable[str], corpus: Path) -> int:
    """One caption per line (newlines inside a caption become spaces); returns how many non-empty lines."""
    count = 0
    with corpus.open("w", encoding="utf-8") as out:
        for text in texts:
            line = " ".join(text.split())
            if line:
                out.write(line + "\n")
                count += 1
    return count


def _train_hf_bpe(corpus: Path, vocab_size: int, output: Path) -> None:
    tokenizers = require_extra("tokenizers", "dalle-tokenizers", "hf")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    # NFC so that "é" typed as one or as two code points is the same bytes, hence the same ids.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[HF_PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    tokenizer.save(str(output))


def _train_yttm(corpus: Path, vocab_size: int, output: Path) -> None:
    youtokentome = require_extra("youtokentome", "dalle-tokenizers", "yttm")
    try:
        youtokentome.BPE.train(
            data=str(corpus), model=str(output), vocab_size=vocab_size, pad_id=0, unk_id=1, bos_id=2, eos_id=3
        )
    except ValueError as error:  # e.g. "Vocabulary size too small. Set vocab_size>=24."
        raise ConfigError(f"vocab_size: {' '.join(str(error).split())}") from None
