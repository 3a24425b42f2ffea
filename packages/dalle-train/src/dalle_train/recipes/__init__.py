"""Named run configs shipped with the package: ``dalle train --config tiny-cpu``.

- ``tiny-cpu``: the built-in shapes data, a small VAE and transformer; minutes on a laptop CPU.
- ``cub200``: a CUB-200-like folder of bird photos with ten captions each (``data.path``), 128 px.
- ``coco``: COCO-like WebDataset shards (``data.path``), 256 px, bf16, for several GPUs under torchrun.

Each is a YAML file beside this module; ``--set`` overrides any field (e.g. ``--set data.path=/data/birds``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from dalle_core.errors import ConfigError


def list_recipes() -> list[str]:
    return sorted(entry.name[: -len(".yaml")] for entry in files(__name__).iterdir() if entry.name.endswith(".yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of recipe ``name``; an unknown name (that is not a file either) raises ConfigError."""
    entry = files(__name__).joinpath(f"{name}.yaml")
    if not entry.is_file():
        raise ConfigError(
            f"--config {name!r} is neither a config file nor a recipe; recipes: {', '.join(list_recipes())}"
        )
    return Path(str(entry))
