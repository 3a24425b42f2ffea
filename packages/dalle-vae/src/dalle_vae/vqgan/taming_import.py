"""Reading taming-transformers checkpoints: a ``.yaml`` model config and a Lightning ``.ckpt``.

The YAML is OmegaConf-style but plain YAML (``model.target``, ``model.params.{n_embed, embed_dim, ddconfig}``), read
with PyYAML. The ``.ckpt`` is a ``torch.save`` dict whose ``"state_dict"`` holds the weights under taming's names;
it often holds Lightning objects too, so it is read with :func:`dalle_vae.pickles.load_torch_file` (tensors only,
other objects inert). Keys under ``loss.`` (the discriminator and LPIPS network used in training) are dropped; every
other key must match the model exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from dalle_core.errors import CheckpointError, ConfigError
from dalle_vae.pickles import load_torch_file, require_plain
from dalle_vae.vqgan.config import VQGanConfig

TARGETS = {"taming.models.vqgan.VQModel": "vector", "taming.models.vqgan.GumbelVQ": "gumbel"}
DDCONFIG_FIELDS = (
    "z_channels",
    "resolution",
    "in_channels",
    "out_ch",
    "ch",
    "ch_mult",
    "num_res_blocks",
    "attn_resolutions",
    "resamp_with_conv",
)
# Training-only parts of a taming checkpoint: its loss module (discriminator, LPIPS).
TRAINING_ONLY_PREFIXES = ("loss.",)


def read_taming_yaml(path: str | Path, image_size: int | None = None) -> VQGanConfig:
    """A :class:`VQGanConfig` from a taming model config (``configs/*.yaml`` or a release's ``model.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VQGAN config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: expected a 'model' section with 'target' and 'params'")
    target = model.get("target")
    if target not in TARGETS:
        raise ConfigError(f"{path}: model.target must be one of {', '.join(TARGETS)}, got {target!r}")
    params = model.get("params")
    if not isinstance(params, dict) or not isinstance(params.get("ddconfig"), dict):
        raise ConfigError(f"{path}: expected model.params.ddconfig")
    ddconfig = params["ddconfig"]
    if params.get("remap") is not None:
        raise ConfigError(f"{path}: model.params.remap (a code remapping file) is not supported")
    if ddconfig.get("double_z", False):
        raise ConfigError(f"{path}: model.params.ddconfig.double_z must be false for a VQGAN")
    fields: dict[str, Any] = {name: ddconfig[name] for name in DDCONFIG_FIELDS if name in ddconfig}
    for name in ("ch_mult", "attn_resolutions"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    for name in ("n_embed", "embed_dim"):
        if name not in params:
            raise ConfigError(f"{path}: missing model.params.{name}")
        fields[name] = params[name]
    try:
        return VQGanConfig.from_dict({"quantizer": TARGETS[target], **fields, "image_size": image_size})
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def read_taming_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of a taming ``.ckpt``, training-only entries dropped."""
    checkpoint = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        found = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(f"{path}: expected a Lightning checkpoint with a 'state_dict' entry, found {found}")
    state = require_plain(checkpoint["state_dict"], path, "state_dict", lambda value: isinstance(value, dict))
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: state_dict entry {name!r} is not a named tensor")
    return {name: value for name, value in state.items() if not name.startswith(TRAINING_ONLY_PREFIXES)}
