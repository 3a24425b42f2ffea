"""Weights out of OpenAI's ``encoder.pkl`` / ``decoder.pkl`` without running the ``dall_e`` package.

Those files are ``torch.save`` pickles of whole ``dall_e.encoder.Encoder`` / ``dall_e.decoder.Decoder`` modules. They
are read with :class:`dalle_vae.pickles.RestrictedUnpickler`: the ``dall_e`` classes and the few torch modules in
them (Sequential, ReLU, MaxPool2d, Upsample, Identity) become stand-ins that only record their state, tensors are
rebuilt by torch's own functions, and any other name in the file is refused. The recorded module tree is then checked
against the architecture its hyperparameters imply, class by class and tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dalle_core.errors import CheckpointError
from dalle_vae.directory import describe_keys
from dalle_vae.pickles import PickledObject, restricted_torch_load

ENCODER_CLASS = "dall_e.encoder.Encoder"
DECODER_CLASS = "dall_e.decoder.Decoder"
CONV_CLASS = "dall_e.utils.Conv2d"
# Every class an OpenAI dVAE pickle may name; nothing else is accepted.
MODULE_CLASSES = {
    ENCODER_CLASS: None,
    DECODER_CLASS: None,
    "dall_e.encoder.EncoderBlock": None,
    "dall_e.decoder.DecoderBlock": None,
    CONV_CLASS: nn.Conv2d,
    "torch.nn.modules.container.Sequential": nn.Sequential,
    "torch.nn.modules.activation.ReLU": nn.ReLU,
    "torch.nn.modules.pooling.MaxPool2d": nn.MaxPool2d,
    "torch.nn.modules.upsampling.Upsample": nn.Upsample,
    "torch.nn.modules.linear.Identity": nn.Identity,
}
_BLOCK_CLASSES = {"EncoderBlock": "dall_e.encoder.EncoderBlock", "DecoderBlock": "dall_e.decoder.DecoderBlock"}


def read_dall_e_pickle(path: str | Path, expected_class: str) -> PickledObject:
    """The recorded module tree of a ``dall_e`` pickle whose top object must be ``expected_class``."""
    refusal = "an OpenAI dVAE pickle holds only dall_e and torch modules and tensors"
    root = restricted_torch_load(path, stand_ins=MODULE_CLASSES, refusal=refusal)
    name = getattr(root, "pickled_name", type(root).__name__)
    if name != expected_class:
        raise CheckpointError(f"{path}: expected a pickled {expected_class}, found {name}")
    _check_module(root, path, "(root)")
    return root


def _check_module(node: Any, path: str | Path, where: str) -> dict[str, Any]:
    if not isinstance(node, PickledObject) or not isinstance(node.state, dict):
        raise CheckpointError(f"{path}: {where} is not a pickled module")
    for key in ("_modules", "_parameters"):
        if not isinstance(node.state.get(key, {}), dict):
            raise CheckpointError(f"{path}: {where}.{key} is not a dict")
    return node.state


def hyperparameter(root: PickledObject, name: str, path: str | Path) -> int:
    """An integer attribute of the pickled Encoder/Decoder (``n_hid``, ``vocab_size``, ...)."""
    value = root.state.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{path}: expected an integer attribute {name} on {root.pickled_name}, got {value!r}")
    return value


def flatten_tree(root: PickledObject, path: str | Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``({module path: pickled class}, {parameter path: tensor})`` with ``w``/``b`` renamed ``weight``/``bias``."""
    classes: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}

    def visit(node: PickledObject, prefix: str) -> None:
        state = _check_module(node, path, prefix or "(root)")
        classes[prefix] = node.pickled_name
        for name, tensor in state.get("_parameters", {}).items():
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{path}: parameter {prefix}.{name} is not a tensor")
            renamed = {"w": "weight", "b": "bias"}.get(name, name) if node.pickled_name == CONV_CLASS else name
            tensors[f"{prefix}.{renamed}" if prefix else renamed] = tensor.detach()
        for name, child in state.get("_modules", {}).items():
            if child is not None:
                visit(child, f"{prefix}.{name}" if prefix else name)

    visit(root, "")
    return classes, tensors


def expected_classes(model: nn.Module, root_class: str) -> dict[str, str]:
    """The ``dall_e`` class each module path of our ``model`` corresponds to."""
    ours_to_theirs = {cls: name for name, cls in MODULE_CLASSES.items() if cls is not None}
    classes = {"": root_class}
    for name, module in model.named_modules():
        if not name:
            continue
        kind = type(module).__name__
        if kind == "ResidualBlock":
            kind = "EncoderBlock" if root_class == ENCODER_CLASS else "DecoderBlock"
            classes[name] = _BLOCK_CLASSES[kind]
        else:
            classes[name] = ours_to_theirs[type(module)]
    return classes


def load_into(model: nn.Module, root: PickledObject, root_class: str, path: str | Path) -> None:
    """Copy a recorded tree's tensors into ``model`` after checking every module class and tensor shape."""
    classes, tensors = flatten_tree(root, path)
    expected = expected_classes(model, root_class)
    for name in sorted(set(expected) | set(classes)):
        if expected.get(name) != classes.get(name):
            raise CheckpointError(
                f"{path}: module {name or '(root)'} is {classes.get(name, 'missing')}, "
                f"expected {expected.get(name, 'nothing')} for these hyperparameters"
            )
    state = model.state_dict()
    missing, unexpected = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: missing tensors {describe_keys(missing)}, unexpected tensors {describe_keys(unexpected)}"
        )
    for name, tensor in tensors.items():
        if tensor.shape != state[name].shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(state[name].shape)}"
            )
    model.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
