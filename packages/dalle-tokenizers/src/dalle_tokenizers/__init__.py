"""dalle-tokenizers: text tokenizers that satisfy ``dalle_core.TextTokenizer``.

``simple`` (UTF-8 bytes, no dependencies), ``clip-bpe`` (CLIP's BPE, as DALLE-pytorch and open_clip), ``hf`` (any
Hugging Face ``tokenizer.json``, extra ``hf``) and ``yttm`` (YouTokenToMe, extra ``yttm``); BPE training in
:mod:`dalle_tokenizers.training`. Optional dependencies are imported only when a tokenizer needs them.
"""

from dalle_tokenizers.clip_bpe import ClipBpeTokenizer
from dalle_tokenizers.factory import build_text_tokenizer
from dalle_tokenizers.hf import HfTokenizer
from dalle_tokenizers.simple import SimpleTokenizer
from dalle_tokenizers.training import train_bpe, train_bpe_from_texts
from dalle_tokenizers.yttm import YttmTokenizer

__all__ = [
    "ClipBpeTokenizer",
    "HfTokenizer",
    "SimpleTokenizer",
    "YttmTokenizer",
    "build_text_tokenizer",
    "train_bpe",
    "train_bpe_from_texts",
]
