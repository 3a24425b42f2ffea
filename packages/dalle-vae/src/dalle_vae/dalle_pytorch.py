"""Import of DALLE-pytorch ``DiscreteVAE`` checkpoints (``vae.pt``: ``{"hparams": ..., "weights": state_dict}``).

DALLE-pytorch builds its encoder as ``num_layers`` ``Sequential(Conv2d, ReLU)`` pairs (``encoder.{i}.0``), then
``num_resnet_blocks`` ResBlocks (``encoder.{L+j}.net.{0,2,4}``), then a 1x1 conv to the code logits; its decoder is
``[1x1 conv, ResBlocks]`` when ``num_resnet_blocks > 0`` (nothing otherwise), then ``num_layers``
``Sequential(ConvTranspose2d, ReLU)`` pairs, then a 1x1 conv to the image. Our ``DiscreteVAE`` has the same layers
in flat Sequentials; :func:`dalle_pytorch_key_map` gives the correspondence, and ``decoder_input_conv`` follows
DALLE-pytorch (present only with resnet blocks), so logits and reconstructions are the same numbers.

Two differences remain, both on purpose: ``decode`` returns ``[0, 1]`` images (DALLE-pytorch's returns the
normalized space, roughly ``[-1, 1]``), and ``kl_div_loss_weight`` is carried over as is although our KL term is
averaged over the batch where DALLE-pytorch's is summed (see the README).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dalle_core.errors import CheckpointError, ConfigError
from dalle_vae.config import DiscreteVAEConfig
from dalle_vae.directory import load_state_strictly
from dalle_vae.discrete_vae import DiscreteVAE
from dalle_vae.pickles import load_torch_file, require_plain

# DALLE-pytorch 1.6.6 DiscreteVAE constructor defaults (used for hparams a checkpoint does not list).
DALLE_PYTORCH_DEFAULTS: dict[str, Any] = {
    "image_size": 256,
    "num_tokens": 512,
    "codebook_dim": 512,
    "num_layers": 3,
    "num_resnet_blocks": 0,
    "hidden_dim": 64,
    "channels": 3,
    "smooth_l1_loss": False,
    "temperature": 0.9,
    "straight_through": False,
    "reinmax": False,
    "kl_div_loss_weight": 0.0,
}
# Its default normalization, cut to the first `channels` entries: [0, 1] -> [-1, 1] for RGB, a 4th channel untouched.
DALLE_PYTORCH_NORMALIZATION = ((0.5, 0.5, 0.5, 0.0), (0.5, 0.5, 0.5, 1.0))


def config_from_dalle_pytorch(hparams: Mapping[str, Any]) -> DiscreteVAEConfig:
    """Our config for a DALLE-pytorch ``DiscreteVAE(**hparams)``; unknown names raise ConfigError."""
    known = {*DALLE_PYTORCH_DEFAULTS, "normalization"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ConfigError(f"unknown DALLE-pytorch DiscreteVAE option {unknown[0]}; expected one of {sorted(known)}")
    values = {**DALLE_PYTORCH_DEFAULTS, **hparams}
    channels = values["channels"]
    try:
        if "normalization" in hparams:
            normalization = hparams["normalization"]
        else:
            if not isinstance(channels, int) or not 1 <= channels <= len(DALLE_PYTORCH_NORMALIZATION[0]):
                raise ConfigError(f"channels: DALLE-pytorch's default normalization covers 1 to 4, got {channels!r}")
            normalization = DALLE_PYTORCH_NORMALIZATION
        if normalization is not None:  # DALLE-pytorch cuts whatever it is given to `channels` entries
            normalization = tuple(tuple(part)[:channels] for part in normalization)
    except TypeError:
        raise ConfigError(f"normalization must be a pair (means, stds), got {hparams.get('normalization')!r}") from None
    blocks = values["num_resnet_blocks"]
    fields = {
        **values,
        "normalization": normalization,
        # DALLE-pytorch ignores reinmax without straight_through; ours rejects that combination, so drop it.
        "reinmax": values["reinmax"] is True and values["straight_through"] is True,
        # DALLE-pytorch's decoder starts with a 1x1 conv only when it has resnet blocks.
        "decoder_input_conv": isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > 0,
    }
    return DiscreteVAEConfig(**fields)


def dalle_pytorch_key_map(config: DiscreteVAEConfig) -> dict[str, str]:
    """``{DALLE-pytorch parameter name: our parameter name}`` for a model with this config."""
    layers, blocks = config.num_layers, config.num_resnet_blocks
    if config.decoder_input_conv != (blocks > 0):
        raise ConfigError("decoder_input_conv must be num_resnet_blocks > 0 to match DALLE-pytorch's layout")
    names: dict[str, str] = {"codebook.weight": "codebook.weight"}

    def add(theirs: str, ours: str) -> None:
        for suffix in ("weight", "bias"):
            names[f"{theirs}.{suffix}"] = f"{ours}.{suffix}"

    def add_resblock(theirs: str, ours: str) -> None:
        for conv in (0, 2, 4):
            add(f"{theirs}.net.{conv}", f"{ours}.net.{conv}")

    # Ours: [conv, relu] * L, resblocks, conv.  Theirs: [Sequential(conv, relu)] * L, resblocks, conv.
    for layer in range(layers):
        add(f"encoder.{layer}.0", f"encoder.{2 * layer}")
    for block in range(blocks):
        add_resblock(f"encoder.{layers + block}", f"encoder.{2 * layers + block}")
    add(f"encoder.{layers + blocks}", f"encoder.{2 * layers + blocks}")

    # Ours: [conv if decoder_input_conv], resblocks, [convT, relu] * L, conv.  Theirs: the same with Sequential pairs.
    start = 1 if config.decoder_input_conv else 0
    if config.decoder_input_conv:
        add("decoder.0", "decoder.0")
    for block in range(blocks):
        add_resblock(f"decoder.{start + block}", f"decoder.{start + block}")
    for layer in range(layers):
        add(f"decoder.{start + blocks + layer}.0", f"decoder.{start + blocks + 2 * layer}")
    add(f"decoder.{start + blocks + layers}", f"decoder.{start + blocks + 2 * layers}")
    return names


def discrete_vae_from_dalle_pytorch(
    hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor], source: str | Path = "weights"
) -> DiscreteVAE:
    """A :class:`DiscreteVAE` equal to DALLE-pytorch's ``DiscreteVAE(**hparams)`` with ``weights`` loaded.

    Use it directly for the VAE inside a DALLE-pytorch ``dalle.pt`` (its ``vae_params`` and the ``vae.``-prefixed
    weights with the prefix removed). Loading is strict: missing or unexpected names raise CheckpointError.
    """
    try:
        config = config_from_dalle_pytorch(hparams)
    except ConfigError as error:
        raise CheckpointError(f"{source}: hparams: {error}") from None
    key_map = dalle_pytorch_key_map(config)
    unexpected = sorted(set(weights) - set(key_map))
    missing = sorted(set(key_map) - set(weights))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match DALLE-pytorch's DiscreteVAE for these hparams: missing "
            f"{', '.join(missing[:5]) or 'none'}, unexpected {', '.join(unexpected[:5]) or 'none'}"
        )
    model = DiscreteVAE(config)
    load_state_strictly(model, {key_map[name]: tensor for name, tensor in weights.items()}, source)
    return model.eval()


def load_dalle_pytorch_vae(path: str | Path, *, trust_pickle: bool = False) -> DiscreteVAE:
    """Load a DALLE-pytorch ``vae.pt`` (read with ``torch.load(weights_only=True)``; see :mod:`dalle_vae.pickles`)."""
    data = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(data, dict) or "hparams" not in data or "weights" not in data:
        found = sorted(map(str, data))[:5] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path}: expected a DALLE-pytorch vae.pt with 'hparams' and 'weights', found {found}")
    hparams = require_plain(data["hparams"], path, "hparams", lambda value: isinstance(value, dict))
    weights = require_plain(data["weights"], path, "weights", lambda value: isinstance(value, dict))
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: weights entry {name!r} is not a tensor")
    return discrete_vae_from_dalle_pytorch(hparams, weights, path)
