"""Optional dependencies, imported when first needed, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from dalle_core.errors import MissingExtraError

PACKAGE = "dalle-tokenizers"


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` telling how to install ``dalle-tokenizers[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(module, extra, PACKAGE) from None
