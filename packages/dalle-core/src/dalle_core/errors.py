"""The error hierarchy shared by every dalle package.

Everything a user can cause raises a subclass of :class:`DalleError` with a one-line message that says what was
expected and what was received. The CLI prints such errors as one line instead of a traceback.
"""

from __future__ import annotations


class DalleError(Exception):
    """Base class of every error a user can cause."""


class ConfigError(DalleError, ValueError):
    """A config value is missing, of the wrong type, or inconsistent with another; the message names the field."""


class CheckpointError(DalleError):
    """A checkpoint directory or file is missing, incomplete or of an unknown format."""


class ShapeError(DalleError, ValueError):
    """A tensor given to a model or tokenizer has the wrong shape, dtype or value range."""


class VocabularyError(DalleError, ValueError):
    """Token ids do not fit a vocabulary: caught before they reach an embedding."""


class TextTooLongError(DalleError, ValueError):
    """A text encodes to more tokens than the context length and truncation was not requested."""


class RegistryError(DalleError, LookupError):
    """No image or text tokenizer is registered under the requested name."""


class MissingExtraError(DalleError, ImportError):
    """An optional dependency is not installed; the message names the install command."""

    def __init__(self, module: str, extra: str, package: str) -> None:
        super().__init__(
            f"{module!r} is not installed; install it with: uv pip install '{package}[{extra}]' "
            f"(or `uv sync --extra {extra}` in a checkout)"
        )
        self.module = module
        self.extra = extra
        self.package = package


class DataError(DalleError):
    """A dataset is missing, empty or unreadable."""
