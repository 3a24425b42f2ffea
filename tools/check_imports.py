"""Fail if any package imports one it may not depend on.

Allowed direction: dalle (CLI) -> dalle_eval -> dalle_train -> dalle_tokenizers | dalle_vae | dalle_transformer ->
dalle_core. The three middle packages never import each other. Reads source with `ast`, so it needs no installs.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "dalle_core": set(),
    "dalle_tokenizers": {"dalle_core"},
    "dalle_vae": {"dalle_core"},
    "dalle_transformer": {"dalle_core"},
    "dalle_train": {"dalle_core", "dalle_tokenizers", "dalle_vae", "dalle_transformer"},
    "dalle_eval": {"dalle_core", "dalle_tokenizers", "dalle_vae", "dalle_transformer", "dalle_train"},
    "dalle": {"dalle_core", "dalle_tokenizers", "dalle_vae", "dalle_transformer", "dalle_train", "dalle_eval"},
}
SOURCES = {name: ROOT / "packages" / name.replace("_", "-") / "src" / name for name in ALLOWED if name != "dalle"}
SOURCES["dalle"] = ROOT / "src" / "dalle"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def main() -> int:
    problems = []
    for package, source in SOURCES.items():
        if not source.is_dir():
            problems.append(f"missing source directory {source}")
            continue
        for path in sorted(source.rglob("*.py")):
            for module in sorted(imported_modules(path) & set(ALLOWED)):
                if module != package and module not in ALLOWED[package]:
                    problems.append(f"{path.relative_to(ROOT)}: {package} may not import {module}")
    for problem in problems:
        print(problem)
    print(f"checked {len(SOURCES)} packages: {len(problems)} upward or sideways imports")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
