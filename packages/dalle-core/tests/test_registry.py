from __future__ import annotations

import pytest

from dalle_core import registry
from dalle_core.checkpoint import write_json
from dalle_core.errors import CheckpointError, RegistryError


class _Toy:
    kind = "toy-for-registry-test"

    def __init__(self, directory):
        self.directory = directory

    @classmethod
    def load(cls, directory):
        return cls(directory)


def test_runtime_registration_and_load(tmp_path):
    registry.register(registry.TEXT_TOKENIZERS, _Toy.kind, _Toy)
    assert _Toy.kind in registry.available(registry.TEXT_TOKENIZERS)
    write_json(tmp_path / "spec.json", {"kind": _Toy.kind})
    loaded = registry.load_text_tokenizer(tmp_path)
    assert isinstance(loaded, _Toy) and loaded.directory == tmp_path


def test_unknown_names_and_missing_specs(tmp_path):
    with pytest.raises(RegistryError, match="no dalle.image_tokenizers entry named 'nope'"):
        registry.resolve(registry.IMAGE_TOKENIZERS, "nope")
    with pytest.raises(CheckpointError, match="expected spec.json"):
        registry.load_image_tokenizer(tmp_path)
    write_json(tmp_path / "spec.json", {"kind": 3})
    with pytest.raises(CheckpointError, match="expected a string field 'kind'"):
        registry.load_image_tokenizer(tmp_path)
    with pytest.raises(RegistryError, match="unknown registry group"):
        registry.register("dalle.nothing", "x", _Toy)
