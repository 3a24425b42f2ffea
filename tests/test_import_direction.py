from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_checker():
    spec = importlib.util.spec_from_file_location("check_imports", ROOT / "tools" / "check_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_repository_has_no_upward_imports():
    assert load_checker().main() == 0


def test_the_checker_sees_an_upward_import(tmp_path):
    checker = load_checker()
    source = tmp_path / "bad.py"
    source.write_text("import os\nfrom dalle_train.bundle import Bundle\nimport dalle_eval.metrics as m\n")
    assert checker.imported_modules(source) == {"os", "dalle_train", "dalle_eval"}
    assert "dalle_train" not in checker.ALLOWED["dalle_vae"]
