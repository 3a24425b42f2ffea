from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from dalle_core.config import apply_overrides, from_dict, load_config, read_config_file, to_dict, write_config_file
from dalle_core.errors import ConfigError


@dataclass(frozen=True)
class Inner:
    depth: int = 2
    kinds: tuple[str, ...] = ("full",)


@dataclass(frozen=True)
class Outer:
    name: str
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_round_trip_through_yaml_and_json(tmp_path):
    config = Outer(name="x", rate=2, limit=5, inner=Inner(depth=3, kinds=("full", "axial_row")))
    assert config.rate == 2
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"c{suffix}"
        write_config_file(config, path)
        assert load_config(Outer, path) == config
    assert to_dict(config)["inner"]["kinds"] == ["full", "axial_row"]


def test_int_is_accepted_as_float_but_not_the_reverse():
    assert from_dict(Outer, {"name": "x", "rate": 1}).rate == 1.0
    assert isinstance(from_dict(Outer, {"name": "x", "rate": 1}).rate, float)
    with pytest.raises(ConfigError, match=r"^inner\.depth: expected an integer, got 2\.5$"):
        from_dict(Outer, {"name": "x", "inner": {"depth": 2.5}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "missing required config field name"),
        ({"name": "x", "mode": "c"}, "mode: expected one of ['a', 'b'], got 'c'"),
        ({"name": "x", "inner": {"dpth": 1}}, "unknown config field inner.dpth"),
        ({"name": "x", "inner": {"kinds": "full"}}, "inner.kinds: expected a list, got 'full'"),
        ({"name": "x", "inner": {"kinds": ["full", 3]}}, "inner.kinds[1]: expected a string, got 3"),
        ({"name": "x", "limit": "many"}, "limit: expected an integer, got 'many'"),
        ({"name": True}, "name: expected a string, got True"),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(Outer, data)
    assert message in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_overrides_parse_yaml_values_and_create_sections():
    data = apply_overrides({"name": "x", "inner": {"depth": 1}}, ["inner.depth=4", "rate=0.5", "inner.kinds=[a, b]"])
    assert data == {"name": "x", "rate": 0.5, "inner": {"depth": 4, "kinds": ["a", "b"]}}
    assert apply_overrides({}, ["a.b.c=true"]) == {"a": {"b": {"c": True}}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["depth"])
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides({"name": "x"}, ["name.first=1"])


def test_bad_files_give_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config_file(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level, got list"):
        read_config_file(listing)
