"""Reading ``torch.save`` files without running code from them.

A pickle names the callables that rebuild its objects, and plain ``pickle.load`` calls them: a ``.pt``/``.pkl`` file
can run anything. ``torch.load(weights_only=True)`` allows only tensors and plain containers, which is enough for
most state dicts but not for OpenAI's dVAE files (whole pickled ``dall_e`` modules) nor for many Lightning ``.ckpt``
files (callback state keyed by callback classes). For those, :class:`RestrictedUnpickler` resolves every name the
pickle mentions through an allowlist: torch's tensor-rebuilding functions and a few builtin containers are real, and
every other class becomes a :class:`PickledObject` stand-in that only records its arguments and state. Nothing from
the file is ever imported or called.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import pickle
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, ClassVar

import torch

from dalle_core.errors import CheckpointError

TRUST_HINT = "if you trust the file, pass trust_pickle=True to unpickle it fully (that runs code stored in the file)"


class PickledObject:
    """Stand-in for an instance of a class that a pickle names: holds constructor ``args`` and ``state``, no behaviour.

    ``pickled_name`` is the class's ``module.qualname`` as written in the pickle. Subclasses of dict or list are
    pickled as their class plus items: those land in ``items`` / ``elements``.
    """

    pickled_name: ClassVar[str] = "?"
    # torch's legacy (pre-zip) format checks the source of pickled nn.Module classes and reads this attribute.
    dump_patches: ClassVar[bool] = False
    args: tuple[Any, ...]
    state: Any
    items: dict[Any, Any]
    elements: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        instance = object.__new__(cls)
        instance.args = args
        instance.state = None
        instance.items = {}
        instance.elements = []
        return instance

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # the pickle's REDUCE calls the class: record only
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.elements.append(value)

    def extend(self, values: Any) -> None:
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


_STAND_INS: dict[str, type[PickledObject]] = {}


def stand_in_class(qualified_name: str) -> type[PickledObject]:
    """The (cached) stand-in class for ``module.qualname``."""
    if qualified_name not in _STAND_INS:
        name = qualified_name.rsplit(".", 1)[-1]
        # A module name that cannot be imported keeps inspect (used by torch's legacy loader) from finding source.
        namespace = {"pickled_name": qualified_name, "__module__": "<pickled>"}
        _STAND_INS[qualified_name] = type(name, (PickledObject,), namespace)
    return _STAND_INS[qualified_name]


# What a tensor or parameter pickle needs: the same rebuild functions torch's own weights_only loader trusts.
TORCH_REBUILDERS: dict[str, Any] = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch._utils._rebuild_tensor_v3": torch._utils._rebuild_tensor_v3,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "_codecs.encode": codecs.encode,  # how protocol 2 stores bytes
}
for _dtype_name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"):
    TORCH_REBUILDERS[f"torch.{_dtype_name}"] = getattr(torch, _dtype_name)


class ForbiddenGlobalError(pickle.UnpicklingError):
    """The pickle names a global that is neither allowed nor to be stood in for."""

    def __init__(self, qualified_name: str) -> None:
        super().__init__(qualified_name)
        self.qualified_name = qualified_name


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves names only through ``allowed`` (real objects) and ``stand_ins`` (recorders).

    ``stand_ins=None`` stands in for every name not in ``allowed``; otherwise a name in neither raises
    :class:`ForbiddenGlobalError`. Configure a subclass with :func:`restricted_unpickler`.
    """

    allowed: ClassVar[dict[str, Any]] = TORCH_REBUILDERS
    stand_ins: ClassVar[frozenset[str] | None] = frozenset()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles written by Python 3 carry Python 2 names ("__builtin__.set"); map them back first.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in self.allowed:
            return self.allowed[qualified]
        if self.stand_ins is None or qualified in self.stand_ins:
            return stand_in_class(qualified)
        raise ForbiddenGlobalError(qualified)


def restricted_unpickler(stand_ins: Collection[str] | None) -> type[RestrictedUnpickler]:
    """A :class:`RestrictedUnpickler` subclass standing in for ``stand_ins`` (``None``: for every unknown name)."""
    names = None if stand_ins is None else frozenset(stand_ins)
    return type("ConfiguredUnpickler", (RestrictedUnpickler,), {"stand_ins": names})


def _pickle_module(unpickler: type[pickle.Unpickler]) -> types.ModuleType:
    """A stand-in for the ``pickle`` module that ``torch.load(pickle_module=...)`` accepts."""
    module = types.ModuleType("dalle_vae_restricted_pickle")
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kwargs: unpickler(file, **kwargs).load()  # type: ignore[attr-defined]
    return module


# What torch.load raises for a file that is not a (complete) torch.save file: it varies with how the bytes fail.
_READ_ERRORS = (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, OSError)


def _not_readable(path: Path, error: BaseException) -> CheckpointError:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CheckpointError(f"{path}: not a readable torch.save file ({detail[:200]})")


def restricted_torch_load(path: str | Path, stand_ins: Collection[str] | None, refusal: str = TRUST_HINT) -> Any:
    """``torch.load`` through :class:`RestrictedUnpickler`: tensors are real, other objects are stand-ins.

    torch's zip and legacy formats both work (torch reads the container, this unpickler resolves every name).
    A name outside the allowlist and outside ``stand_ins`` raises CheckpointError naming it, followed by ``refusal``.
    """
    path = Path(path)
    module = _pickle_module(restricted_unpickler(stand_ins))
    try:
        with warnings.catch_warnings():
            # The legacy format warns that it cannot find the source of the (stand-in) module classes.
            warnings.simplefilter("ignore")
            # weights_only=False is what allows a custom pickle_module; the restriction is the unpickler itself.
            return torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except ForbiddenGlobalError as error:
        raise CheckpointError(
            f"{path}: refusing to load {error.qualified_name}, which is not part of this format; {refusal}"
        ) from None
    except (pickle.UnpicklingError, *_READ_ERRORS) as error:
        raise _not_readable(path, error) from None


def load_torch_file(path: str | Path, *, trust_pickle: bool = False) -> Any:
    """Read a ``torch.save`` file on CPU without running code from it (unless ``trust_pickle``).

    First ``torch.load(weights_only=True)``; a file with other objects in it (a Lightning checkpoint's callbacks, say)
    is then read again with every such object replaced by an inert :class:`PickledObject`, so the tensors and plain
    values are still available. ``trust_pickle=True`` uses plain ``torch.load(weights_only=False)``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    if trust_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except (pickle.UnpicklingError, *_READ_ERRORS) as error:
            raise _not_readable(path, error) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # objects beyond tensors and containers (or not a pickle at all): read again with stand-ins for them
    except _READ_ERRORS as error:
        raise _not_readable(path, error) from None
    return restricted_torch_load(path, stand_ins=None)


def require_plain(value: Any, path: str | Path, what: str, check: Callable[[Any], bool] | None = None) -> Any:
    """Raise CheckpointError (with the trust hint) if ``value`` holds a stand-in object anywhere inside it."""
    found = _first_stand_in(value)
    if found is not None:
        raise CheckpointError(f"{path}: {what} holds a pickled {found.pickled_name} object; {TRUST_HINT}")
    if check is not None and not check(value):
        raise CheckpointError(f"{path}: {what} has an unexpected type {type(value).__name__}")
    return value


def _first_stand_in(value: Any, depth: int = 0) -> PickledObject | None:
    if isinstance(value, PickledObject):
        return value
    if depth > 20:
        return None
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        return None
    for item in items:
        found = _first_stand_in(item, depth + 1)
        if found is not None:
            return found
    return None
