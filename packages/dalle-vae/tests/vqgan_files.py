"""Tiny taming-transformers checkpoints (``.ckpt`` + ``.yaml``) with random weights, written for the tests.

The parameter names and shapes come from :func:`taming_parameter_shapes`, written from taming's construction rules
(``Encoder``/``Decoder`` in ``taming/modules/diffusionmodules/model.py``, ``VectorQuantizer2``, ``GumbelQuantize``),
not from our modules: a name we got wrong fails the strict load.
"""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path
from typing import Any

import torch
import yaml

# Small enough for CPU tests, big enough for every kind of layer: two levels, a width change (nin_shortcut),
# attention at 8 px, GroupNorm(32) widths.
TINY_DDCONFIG: dict[str, Any] = {
    "double_z": False,
    "z_channels": 32,
    "resolution": 16,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
}


def taming_parameter_shapes(
    ddconfig: dict[str, Any], n_embed: int, embed_dim: int, gumbel: bool
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, n_in: int, n_out: int, kernel: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in, kernel, kernel)
        shapes[f"{name}.bias"] = (n_out,)

    def norm(name: str, channels: int) -> None:
        shapes[f"{name}.weight"] = (channels,)
        shapes[f"{name}.bias"] = (channels,)

    def resnet(name: str, n_in: int, n_out: int) -> None:
        norm(f"{name}.norm1", n_in)
        conv(f"{name}.conv1", n_in, n_out, 3)
        norm(f"{name}.norm2", n_out)
        conv(f"{name}.conv2", n_out, n_out, 3)
        if n_in != n_out:
            conv(f"{name}.nin_shortcut", n_in, n_out, 1)

    def attention(name: str, channels: int) -> None:
        norm(f"{name}.norm", channels)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", channels, channels, 1)

    def middle(name: str, channels: int) -> None:
        resnet(f"{name}.block_1", channels, channels)
        attention(f"{name}.attn_1", channels)
        resnet(f"{name}.block_2", channels, channels)

    ch, mult, blocks = ddconfig["ch"], ddconfig["ch_mult"], ddconfig["num_res_blocks"]
    attn_at, z = ddconfig["attn_resolutions"], ddconfig["z_channels"]
    levels = len(mult)

    conv("encoder.conv_in", ddconfig["in_channels"], ch, 3)
    size, in_mult = ddconfig["resolution"], [1, *mult]
    for level in range(levels):
        n_in, n_out = ch * in_mult[level], ch * mult[level]
        for block in range(blocks):
            resnet(f"encoder.down.{level}.block.{block}", n_in, n_out)
            n_in = n_out
            if size in attn_at:
                attention(f"encoder.down.{level}.attn.{block}", n_out)
        if level != levels - 1:
            conv(f"encoder.down.{level}.downsample.conv", n_out, n_out, 3)
            size //= 2
    width = ch * mult[-1]
    middle("encoder.mid", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", width, z, 3)

    conv("decoder.conv_in", z, width, 3)
    middle("decoder.mid", width)
    size = ddconfig["resolution"] // 2 ** (levels - 1)
    for level in reversed(range(levels)):
        n_out = ch * mult[level]
        for block in range(blocks + 1):
            resnet(f"decoder.up.{level}.block.{block}", width, n_out)
            width = n_out
            if size in attn_at:
                attention(f"decoder.up.{level}.attn.{block}", n_out)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", n_out, n_out, 3)
            size *= 2
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", width, ddconfig["out_ch"], 3)

    conv("quant_conv", z, embed_dim, 1)
    conv("post_quant_conv", embed_dim, z, 1)
    if gumbel:
        conv("quantize.proj", z, n_embed, 1)
        shapes["quantize.embed.weight"] = (n_embed, embed_dim)
    else:
        shapes["quantize.embedding.weight"] = (n_embed, embed_dim)
    return shapes


def random_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights scaled by fan-in (so activations stay O(1)), norm scales near 1, small random biases."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if len(shape) > 1:
            state[name] = noise / math.sqrt(math.prod(shape[1:]))
        elif ".norm" in name and name.endswith(".weight"):
            state[name] = 1 + 0.1 * noise
        else:
            state[name] = 0.1 * noise
    return state


def taming_yaml(ddconfig: dict[str, Any], n_embed: int, embed_dim: int, gumbel: bool) -> dict[str, Any]:
    """A model config as taming's configs/*.yaml and its releases' model.yaml spell it."""
    params: dict[str, Any] = {
        "embed_dim": embed_dim,
        "n_embed": n_embed,
        "ddconfig": ddconfig,
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
    }
    if gumbel:
        params["kl_weight"] = 1.0e-08
        params["temperature_scheduler_config"] = {
            "target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler",
            "params": {"warm_up_steps": 0, "max_decay_steps": 10, "lr_start": 0.9, "lr_max": 0.9, "lr_min": 1.0e-06},
        }
    target = "taming.models.vqgan.GumbelVQ" if gumbel else "taming.models.vqgan.VQModel"
    return {"model": {"base_learning_rate": 4.5e-06, "target": target, "params": params}}


class ModelCheckpoint:
    """Pickles as pytorch_lightning's callback class, as Lightning 1.0 keyed a checkpoint's callback state by it."""


def write_taming_files(
    directory: Path,
    *,
    gumbel: bool = False,
    n_embed: int = 48,
    embed_dim: int = 32,
    ddconfig: dict[str, Any] | None = None,
    seed: int = 0,
    extra_weights: dict[str, torch.Tensor] | None = None,
    drop: tuple[str, ...] = (),
    lightning_objects: bool = True,
) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Write ``model.ckpt`` and ``model.yaml``; returns their paths and the model weights (without ``loss.*``)."""
    ddconfig = dict(TINY_DDCONFIG if ddconfig is None else ddconfig)
    directory.mkdir(parents=True, exist_ok=True)
    state = random_state_dict(taming_parameter_shapes(ddconfig, n_embed, embed_dim, gumbel), seed)
    for name in drop:
        del state[name]
    stored = {**state, **(extra_weights or {})}
    # A real checkpoint also holds its training loss module (discriminator, LPIPS): dropped on load.
    stored["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
    checkpoint: dict[Any, Any] = {"epoch": 3, "global_step": 100, "state_dict": stored}
    module_name = "pytorch_lightning.callbacks.model_checkpoint"
    # pickle imports the class's module (and so its parents) to check it: provide them for the save only.
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", module_name]
    saved_modules = {name: sys.modules.get(name) for name in names}
    if lightning_objects:
        for name in names:
            if name == module_name or name not in sys.modules:
                sys.modules[name] = types.ModuleType(name)
        ModelCheckpoint.__module__ = module_name
        sys.modules[module_name].ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
        checkpoint["callbacks"] = {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}
        checkpoint["pytorch-lightning_version"] = "1.0.8"
    try:
        torch.save(checkpoint, directory / "model.ckpt")
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    (directory / "model.yaml").write_text(yaml.safe_dump(taming_yaml(ddconfig, n_embed, embed_dim, gumbel)))
    return directory / "model.ckpt", directory / "model.yaml", state
