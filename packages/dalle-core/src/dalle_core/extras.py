"""Optional dependencies (extras), imported when first needed, with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from dalle_core.errors import MissingExtraError


def require_extra(module: str, package: str, extra: str, *, top_level: str | None = None) -> ModuleType:
    """Import ``module``, which the ``extra`` of the distribution ``package`` installs.

    When the extra's own top-level module (``top_level``, by default ``module``'s first component; e.g.
    ``"tensorboard"`` for ``torch.utils.tensorboard``) is not installed, raise :class:`MissingExtraError` with the
    install command for ``package[extra]``. Any other import failure (a module missing inside an installed extra, a
    broken binary) is re-raised as it is: installing the extra again would not fix it.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        expected = top_level or module.split(".")[0]
        if (error.name or "").split(".")[0] != expected:
            raise
        raise MissingExtraError(expected, extra, package) from None
