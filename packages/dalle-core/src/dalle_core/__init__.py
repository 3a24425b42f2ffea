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
from dalle_core.protocols import ImageTokenizer, TextTokenizer

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
