"""Reading torch.save files without running code from them."""

from __future__ import annotations

import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dalle_core import CheckpointError
from dalle_vae.pickles import PickledObject, load_torch_file, require_plain, restricted_torch_load

MARKER = "dalle_vae_test_marker"


def _leave_marker(path: str) -> str:
    """Called only if a pickle's code runs: writes a file the tests look for."""
    Path(path).write_text("code from the pickle ran")
    return "ran"


class _Payload:
    """Unpickles as ``_leave_marker(path)``: any loader that runs the file's code leaves the marker file behind."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (_leave_marker, (self.path,))


@pytest.fixture
def fake_module(monkeypatch: pytest.MonkeyPatch):
    """Put ``_leave_marker`` and classes in an importable module, as a third party's code would be, for saving."""

    def install(name: str, **members: object) -> types.ModuleType:
        module = types.ModuleType(name)
        for attribute, value in members.items():
            value.__module__ = name  # type: ignore[attr-defined]
            setattr(module, attribute, value)
        monkeypatch.setitem(sys.modules, name, module)
        return module

    return install


def test_malicious_pickle_runs_nothing(tmp_path: Path, fake_module) -> None:
    fake_module("evil_module", _leave_marker=_leave_marker)
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Payload(marker)}, tmp_path / "evil.ckpt")
    # The control: a plain unpickler does run it.
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    data = load_torch_file(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert torch.equal(data["state_dict"]["w"], torch.ones(2))
    payload = data["payload"]
    assert isinstance(payload, PickledObject) and payload.pickled_name == "evil_module._leave_marker"
    assert payload.args == (str(marker),)  # recorded, never called
    with pytest.raises(CheckpointError, match=r"payload holds a pickled evil_module\._leave_marker.*trust_pickle"):
        require_plain(data["payload"], tmp_path / "evil.ckpt", "payload")

    # An allowlist without stand-ins refuses the name outright.
    with pytest.raises(CheckpointError, match=r"refusing to load evil_module\._leave_marker"):
        restricted_torch_load(tmp_path / "evil.ckpt", stand_ins=())
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_tensors_parameters_and_containers_round_trip(tmp_path: Path, zip_format: bool) -> None:
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    data = {
        "tensor": torch.arange(6, dtype=torch.float16).view(2, 3)[:, 1:],  # a strided view of a shared storage
        "ordered": OrderedDict(a=torch.ones(1, dtype=torch.int64)),
        "parameter": parameter,
        "set": {1, 2},
        "device": torch.device("cpu"),
        "bytes": b"\x00\x01",
        "nested": [(1, 2.5, "x", None, True)],
    }
    torch.save(data, tmp_path / "plain.pt", _use_new_zipfile_serialization=zip_format)
    loaded = restricted_torch_load(tmp_path / "plain.pt", stand_ins=())
    assert torch.equal(loaded["tensor"], data["tensor"]) and loaded["tensor"].dtype == torch.float16
    assert isinstance(loaded["ordered"], OrderedDict) and torch.equal(loaded["ordered"]["a"], torch.ones(1).long())
    assert isinstance(loaded["parameter"], torch.nn.Parameter) and torch.equal(loaded["parameter"], parameter)
    assert loaded["set"] == {1, 2} and loaded["device"] == torch.device("cpu") and loaded["bytes"] == b"\x00\x01"
    assert loaded["nested"] == [(1, 2.5, "x", None, True)]


def test_weights_only_file_loads_directly(tmp_path: Path) -> None:
    torch.save({"weights": {"a": torch.zeros(2)}}, tmp_path / "plain.pt")
    assert torch.equal(load_torch_file(tmp_path / "plain.pt")["weights"]["a"], torch.zeros(2))


class Recorder(dict):
    """A dict subclass: pickled as class + items, which stand-ins must absorb."""


def test_subclassed_containers_become_stand_ins_with_their_items(tmp_path: Path, fake_module) -> None:
    fake_module("third_party", Recorder=Recorder)
    torch.save({"hp": Recorder(lr=0.1), "w": torch.ones(1)}, tmp_path / "sub.pt")
    data = load_torch_file(tmp_path / "sub.pt")
    assert data["hp"].pickled_name == "third_party.Recorder" and data["hp"].items == {"lr": 0.1}


def test_trust_pickle_uses_the_full_unpickler(tmp_path: Path, fake_module) -> None:
    fake_module("third_party", Recorder=Recorder)
    torch.save({"hp": Recorder(lr=0.1)}, tmp_path / "sub.pt")
    assert isinstance(load_torch_file(tmp_path / "sub.pt", trust_pickle=True)["hp"], Recorder)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_torch_file(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt: not a readable torch\.save file") as info:
        load_torch_file(tmp_path / "text.pt")
    assert len(str(info.value).splitlines()) == 1
    with pytest.raises(CheckpointError, match="not a readable"):
        restricted_torch_load(tmp_path / "text.pt", stand_ins=None)
    raw = tmp_path / "raw.pkl"  # a bare pickle, not a torch.save file
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a readable"):
        restricted_torch_load(raw, stand_ins=None)
