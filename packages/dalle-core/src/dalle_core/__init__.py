"""dalle-core: the interfaces, errors and file formats shared by every dalle package."""

from dalle_core.errors import (
    CheckpointError,
    ConfigError,
    DalleError,
    DataError,
    MissingExtraError,
    RegistryError,
    ShapeError,
    TextTooLongError,
    VocabularyError,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DalleError",
    "DataError",
    "ImageTokenizer",
    "MissingExtraError",
    "RegistryError",
    "ShapeError",
    "TextTokenizer",
    "TextTooLongError",
    "VocabularyError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # The protocols import torch; loading them lazily keeps `import dalle_core.errors` (and `dalle --help`) fast.
    if name in ("ImageTokenizer", "TextTokenizer"):
        from dalle_core import protocols

        return getattr(protocols, name)
    raise AttributeError(f"module 'dalle_core' has no attribute {name!r}")
