"""require_extra: the install command for a missing extra, the original error for anything else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dalle_core.errors import MissingExtraError
from dalle_core.extras import require_extra


def test_installed_module_is_returned() -> None:
    import json

    assert require_extra("json", "dalle-core", "none") is json


def test_missing_extra_names_the_install_command() -> None:
    with pytest.raises(MissingExtraError) as raised:
        require_extra("a_module_that_is_not_installed.sub", "dalle-train", "wandb")
    assert str(raised.value) == (
        "'a_module_that_is_not_installed' is not installed; install it with: uv pip install 'dalle-train[wandb]' "
        "(or `uv sync --extra wandb` in a checkout)"
    )
    assert isinstance(raised.value, ImportError)


def test_top_level_names_the_module_the_extra_provides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed module that imports the extra's package (as torch.utils.tensorboard imports tensorboard).
    (tmp_path / "wrapper_of_extra.py").write_text("import extra_package_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError, match=r"'extra_package_not_installed' is not installed.*'pkg\[x\]'"):
        require_extra("wrapper_of_extra", "pkg", "x", top_level="extra_package_not_installed")


def test_a_broken_installed_extra_keeps_its_own_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The extra is installed but one of its own dependencies is not: reinstalling the extra would not help."""
    (tmp_path / "installed_extra").mkdir()
    (tmp_path / "installed_extra" / "__init__.py").write_text("import its_dependency_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as raised:
        require_extra("installed_extra", "pkg", "x")
    assert not isinstance(raised.value, MissingExtraError)
    assert raised.value.name == "its_dependency_not_installed"
    sys.modules.pop("installed_extra", None)
