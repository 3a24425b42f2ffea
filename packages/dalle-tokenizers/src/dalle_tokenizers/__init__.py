"""dalle-tokenizers: text tokenizers that satisfy ``dalle_core.TextTokenizer``."""

from dalle_tokenizers.simple import SimpleTokenizer

__all__ = ["SimpleTokenizer"]
