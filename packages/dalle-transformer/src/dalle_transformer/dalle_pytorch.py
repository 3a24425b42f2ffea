"""DALLE-pytorch ``dalle.pt`` transformers as ours: hyper-parameters and weights (DALLE-pytorch 0.9 to 1.6.6).

DALLE-pytorch's ``train_dalle.py`` saves ``{"hparams": DALLE(**hparams) arguments, "weights": state_dict, ...}``.
:func:`config_from_dalle_pytorch` turns ``hparams`` into a :class:`DALLEConfig` computing the same function, and
:func:`convert_dalle_pytorch_weights` renames and reshapes the weights (strictly: a missing, unexpected or mis-shaped
entry raises :class:`CheckpointError` naming it). Entries under ``vae.`` are the image tokenizer's and are skipped.

How the two models line up (theirs -> ours):

- Their text embedding has ``num_text_tokens + text_seq_len`` rows and maps the padding id 0 at text position ``i``
  to row ``num_text_tokens + i``: exactly our per-position padding ids with ``text_pad_id=0``, so the table is copied
  as is. Their BOS is text id 0 at position 0, so ``bos = text_emb[0] + text_pos_emb[0]`` (no position term with
  ``rotary_emb``) and our ``text_pos_emb`` is theirs from row 1 on.
- Image positions: their ``AxialPositionalEmbedding`` sums a row table ``weights.0 [1, f, 1, dim]`` and a column
  table ``weights.1 [1, 1, f, dim]`` (named ``weights_0`` / ``weights_1`` by axial-positional-embedding < 0.3).
- Every layer is ``LayerScale(PreNorm(...))``: ``scale [1, 1, dim]`` becomes ``blocks.i.{attn,ff}_scale``
  (``layer_scale=True``), ``norm`` / ``norm_out`` (``sandwich_norm``) the block's norms, ``to_out.0`` our
  ``to_out``; the feed-forward is GEGLU (``ff_activation="geglu"``); conv-like attention uses a 5x5 kernel.
- ``to_logits = Sequential(LayerNorm, Linear)``: ``to_logits.0`` is our ``norm``, ``to_logits.1`` our ``to_logits``.
- Shared layers (``shared_attn_ids`` / ``shared_ff_ids``) and shared embeddings (``share_input_output_emb``) appear
  in their state dict once per user; the copies must be equal and ours keeps one.
- ``transformer.pos_emb`` (with ``rotary_emb``) is their rotary angle table: it is checked against ours, not copied.

Parameter paths: DALLE-pytorch 1.4 and later (from January 2022) wrap each attention in ``CachedAs`` / ``NonCached``
and, with ``shift_tokens``, each branch in ``CachedAs(PreShiftToken(...))``, so the paths have more ``fn.`` levels
than in checkpoints written before (which also lack the ``shift_tokens`` / ``rotary_emb`` hparams before August
2021: missing means False, as the DALLE-pytorch of the time had neither). Both layouts load; which one a file uses
is read from its keys.

Not importable: ``conv_like`` attention before DALLE-pytorch 1.5 (March 2022), whose window was centred on the query
rather than ending at it (a pattern this package does not have); ``attn_types`` ``sparse`` (DeepSpeed's block-sparse
kernel with randomly placed blocks, a layout the checkpoint does not record) and ``mlp`` (gMLP layers, removed in
DALLE-pytorch 1.4); checkpoints from before 0.9 (April 2021), which masked text padding instead of giving it ids.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple, cast

import torch

from dalle_core.errors import CheckpointError, ConfigError
from dalle_transformer.config import AttentionType, DALLEConfig
from dalle_transformer.model import DALLE
from dalle_transformer.rotary import rotary_angles

# DALLE-pytorch 1.6.6's DALLE constructor defaults for the hparams a checkpoint may leave out, except shift_tokens
# and rotary_emb: a checkpoint without them predates both options (their 1.6.6 default is True).
HPARAM_DEFAULTS: dict[str, Any] = {
    "num_text_tokens": 10000,
    "text_seq_len": 256,
    "heads": 8,
    "dim_head": 64,
    "reversible": False,
    "attn_dropout": 0.0,
    "ff_dropout": 0.0,
    "attn_types": None,
    "loss_img_weight": 7,
    "stable": False,
    "sandwich_norm": False,
    "shift_tokens": False,
    "rotary_emb": False,
    "shared_attn_ids": None,
    "shared_ff_ids": None,
    "share_input_output_emb": False,
    # Neither changes the weights nor the logits: sparse_attn is unused in the versions read here (attn_types decides),
    # optimize_for_inference computes axial attention with a dense mask instead of reshaping.
    "sparse_attn": False,
    "optimize_for_inference": False,
}
REQUIRED_HPARAMS = ("dim", "depth")
IMPORTABLE_ATTENTION = ("full", "axial_row", "axial_col", "conv_like")
CONV_KERNEL = 5  # DALLE-pytorch's conv-like attention: 5x5, dilation 1 (not configurable there)
# Names of the two axial position tables: axial-positional-embedding >= 0.3 (ParameterList), and before.
AXIAL_NAMES = (("weights.0", "weights.1"), ("weights_0", "weights_1"))
# Derived tensors some checkpoints hold: DALLE-pytorch 0.9.0 to 0.9.5 saved its logits mask buffer.
DERIVED_KEYS = ("logits_mask",)
IMAGE_TOKENIZER_PREFIX = "vae."
ROTARY_KEY = "transformer.pos_emb"
_ATTENTION_PARAMS = {
    "to_qkv.weight": "to_qkv.weight",
    "to_out.0.weight": "to_out.weight",
    "to_out.0.bias": "to_out.bias",
}
_FEED_FORWARD_PARAMS = {f"net.{i}.{kind}": f"net.{i}.{kind}" for i in (0, 3) for kind in ("weight", "bias")}


def config_from_dalle_pytorch(
    hparams: Mapping[str, Any], image_fmap_size: int, num_image_tokens: int, *, version: str | None = "1.6.6"
) -> DALLEConfig:
    """Our config for DALLE-pytorch's ``DALLE(vae=..., **hparams)`` whose VAE has this grid side and code count.

    Missing hparams take DALLE-pytorch 1.6.6's defaults, except ``shift_tokens`` and ``rotary_emb`` (False: see the
    module docstring). ``version`` is the checkpoint's ``version`` entry, None for files written before December
    2021 (which have none); it matters for ``conv_like`` attention only, which before 1.5 was another pattern.
    Raises CheckpointError for unknown names, missing ``dim``/``depth``, values our config rejects, and attention
    types that cannot be imported.
    """
    if not isinstance(hparams, Mapping):
        raise CheckpointError(f"hparams: expected a mapping of DALLE arguments, got {type(hparams).__name__}")
    unknown = sorted(str(name) for name in hparams if name not in HPARAM_DEFAULTS and name not in REQUIRED_HPARAMS)
    if unknown:
        raise CheckpointError(
            f"hparams: unknown DALLE-pytorch DALLE argument(s) {unknown}; expected names from "
            f"{sorted([*REQUIRED_HPARAMS, *HPARAM_DEFAULTS])}"
        )
    missing = [name for name in REQUIRED_HPARAMS if name not in hparams]
    if missing:
        raise CheckpointError(f"hparams: missing required DALLE argument(s) {missing}")
    values = {**HPARAM_DEFAULTS, **hparams}
    try:
        return DALLEConfig(
            num_text_tokens=values["num_text_tokens"],
            text_seq_len=values["text_seq_len"],
            num_image_tokens=num_image_tokens,
            image_fmap_size=image_fmap_size,
            text_pad_id=0,  # DALLE-pytorch pads every tokenizer's rows with 0
            dim=values["dim"],
            depth=values["depth"],
            heads=values["heads"],
            dim_head=values["dim_head"],
            ff_mult=4,
            attn_dropout=_number(values, "attn_dropout"),
            ff_dropout=_number(values, "ff_dropout"),
            loss_img_weight=_number(values, "loss_img_weight"),
            attn_types=_attention_types(values["attn_types"], version),
            conv_kernel_size=CONV_KERNEL,
            conv_dilation=1,
            reversible=values["reversible"],
            rotary_emb=values["rotary_emb"],
            shift_tokens=values["shift_tokens"],
            sandwich_norm=values["sandwich_norm"],
            stable=values["stable"],
            layer_scale=True,  # every DALLE-pytorch layer since 0.8 is LayerScale(PreNorm(...))
            shared_attn_ids=_share_ids("shared_attn_ids", values["shared_attn_ids"]),
            shared_ff_ids=_share_ids("shared_ff_ids", values["shared_ff_ids"]),
            share_input_output_emb=values["share_input_output_emb"],
            ff_activation="geglu",
        )
    except ConfigError as error:
        raise CheckpointError(f"hparams: {error}") from None


def _number(values: Mapping[str, Any], name: str) -> float:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"hparams: {name} must be a number, got {value!r}")
    return float(value)


def _attention_types(value: Any, version: str | None) -> tuple[AttentionType, ...]:
    """DALLE-pytorch's ``attn_types``: None (full), one name, or a sequence of names cycled over the layers."""
    types = ("full",) if value is None else (value,) if isinstance(value, str) else value
    if not isinstance(types, (list, tuple)) or not types or not all(isinstance(kind, str) for kind in types):
        raise CheckpointError(f"hparams: attn_types must be a name or a list of names, got {value!r}")
    for kind in types:
        if kind == "sparse":
            raise CheckpointError(
                "hparams: attn_types 'sparse' is DeepSpeed's block-sparse attention, whose blocks are placed at "
                "random when the model is built and are not recorded in the checkpoint; it cannot be imported"
            )
        if kind not in IMPORTABLE_ATTENTION:
            raise CheckpointError(
                f"hparams: attn_types {kind!r} cannot be imported; expected one of {list(IMPORTABLE_ATTENTION)}"
            )
    if "conv_like" in types and not _causal_conv_like(version):
        raise CheckpointError(
            f"hparams: attn_types 'conv_like' of DALLE-pytorch {version or '(no version recorded: before 2022)'} "
            f"attends to a centred {CONV_KERNEL}x{CONV_KERNEL} window (keys up to the query in raster order); "
            "DALLE-pytorch 1.5 changed it to the causal window ending at the query, the only one implemented here, "
            "so this checkpoint cannot be imported"
        )
    return cast(tuple[AttentionType, ...], tuple(types))


def _causal_conv_like(version: str | None) -> bool:
    """Whether DALLE-pytorch ``version`` has the causal conv-like window (1.5.0, March 2022, and later)."""
    if version is None:
        return False
    numbers = []
    for part in str(version).split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
    if len(numbers) < 2:
        raise CheckpointError(f"version: cannot read DALLE-pytorch version {version!r} (needed for conv_like)")
    return tuple(numbers) >= (1, 5)


def _share_ids(name: str, value: Any) -> tuple[int, ...] | None:
    """Sharing ids as integers: any hashable ids (train_dalle.py stores strings) numbered by first appearance."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)) or len(value) == 0:
        raise CheckpointError(f"hparams: {name} must be a list of layer ids, got {value!r}")
    numbers: dict[Hashable, int] = {}
    for item in value:
        if not isinstance(item, Hashable):
            raise CheckpointError(f"hparams: {name} holds an unhashable id {item!r}")
        numbers.setdefault(item, len(numbers))
    return tuple(numbers[item] for item in value)


# ---------------------------------------------------------------------------------------------- weight names


class KeyRule(NamedTuple):
    """What to do with one of their tensors: ``how`` it becomes ours (``target`` names ours, or for ``same`` the
    tensor of theirs it must equal)."""

    target: str
    how: str  # copy | scale | rows | cols | text_pos | same | rotary


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parameter naming scheme: ``wrapped`` (1.6.6's CachedAs/NonCached levels) and the axial tables' names."""

    wrapped: bool
    axial_names: tuple[str, str]

    def describe(self) -> str:
        era = "DALLE-pytorch >= 1.4 (2022 on)" if self.wrapped else "DALLE-pytorch < 1.4 (before 2022)"
        return f"{era}, axial tables {'/'.join(self.axial_names)}"


LAYOUTS = tuple(Layout(wrapped, names) for wrapped in (True, False) for names in AXIAL_NAMES)


def _module_levels(branch: int, shift: bool, wrapped: bool) -> int:
    """``fn.`` levels from a branch's LayerScale to its attention (branch 0) or feed-forward (1) module.

    1.6.6: LayerScale -> PreNorm -> [CachedAs -> PreShiftToken ->] [CachedAs | NonCached ->] module (the last
    wrapper for attention only). Before 2022: LayerScale -> PreNorm -> [PreShiftToken ->] module.
    """
    levels = 2 + int(shift)
    if wrapped:
        levels += int(shift) + int(branch == 0)
    return levels


def _branch_prefix(config: DALLEConfig, layer: int, branch: int) -> str:
    if config.reversible:  # ReversibleBlock(f=Deterministic(attn), g=Deterministic(ff)); Deterministic.net
        return f"transformer.layers.blocks.{layer}.{'fg'[branch]}.net."
    return f"transformer.layers.layers.{layer}.{branch}."


def dalle_pytorch_key_plan(config: DALLEConfig, layout: Layout) -> dict[str, KeyRule]:
    """Every transformer tensor name DALLE-pytorch's state dict has for ``config`` in ``layout``, with its rule."""
    plan: dict[str, KeyRule] = {}
    if config.share_input_output_emb:  # SharedEmbedding keeps to_logits.1 as a submodule: a second copy each
        for table in ("text_emb", "image_emb"):
            for kind in ("weight", "bias"):
                plan[f"{table}.linear.{kind}"] = KeyRule(f"to_logits.1.{kind}", "same")
    else:
        plan["text_emb.weight"] = KeyRule("text_emb.weight", "copy")
        plan["image_emb.weight"] = KeyRule("image_emb.weight", "copy")
    if config.rotary_emb:
        plan[ROTARY_KEY] = KeyRule("", "rotary")
    else:
        plan["text_pos_emb.weight"] = KeyRule("text_pos_emb.weight", "text_pos")
        plan[f"image_pos_emb.{layout.axial_names[0]}"] = KeyRule("image_row_emb.weight", "rows")
        plan[f"image_pos_emb.{layout.axial_names[1]}"] = KeyRule("image_col_emb.weight", "cols")
    owners = {
        0: _first_of_id(config.layer_share_ids(config.shared_attn_ids)),
        1: _first_of_id(config.layer_share_ids(config.shared_ff_ids)),
    }
    for layer in range(config.depth):
        for branch, (ours, params) in enumerate((("attn", _ATTENTION_PARAMS), ("ff", _FEED_FORWARD_PARAMS))):
            prefix = _branch_prefix(config, layer, branch)
            plan[f"{prefix}scale"] = KeyRule(f"blocks.{layer}.{ours}_scale", "scale")
            for kind in ("weight", "bias"):
                plan[f"{prefix}fn.norm.{kind}"] = KeyRule(f"blocks.{layer}.{ours}_norm.{kind}", "copy")
                if config.sandwich_norm:
                    plan[f"{prefix}fn.norm_out.{kind}"] = KeyRule(f"blocks.{layer}.{ours}_out_norm.{kind}", "copy")
            owner = owners[branch][layer]
            levels = _module_levels(branch, config.shift_tokens, layout.wrapped)
            module = prefix + "fn." * levels
            owner_module = _branch_prefix(config, owner, branch) + "fn." * levels
            for theirs, our_param in params.items():
                if owner == layer:
                    plan[module + theirs] = KeyRule(f"blocks.{layer}.{ours}.{our_param}", "copy")
                else:
                    plan[module + theirs] = KeyRule(owner_module + theirs, "same")
    for kind in ("weight", "bias"):
        plan[f"to_logits.0.{kind}"] = KeyRule(f"norm.{kind}", "copy")
        plan[f"to_logits.1.{kind}"] = KeyRule(f"to_logits.{kind}", "copy")
    return plan


def _first_of_id(ids: tuple[int, ...]) -> tuple[int, ...]:
    first: dict[int, int] = {}
    return tuple(first.setdefault(share_id, index) for index, share_id in enumerate(ids))


# ---------------------------------------------------------------------------------------------- conversion


def transformer_weights(weights: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The transformer's entries of a DALLE-pytorch state dict (``vae.*`` and derived buffers dropped), checked to be
    named tensors."""
    kept: dict[str, torch.Tensor] = {}
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"weights: expected a state dict, got {type(weights).__name__}")
    for name, value in weights.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"weights: entry {name!r} is not a named tensor ({type(value).__name__})")
        if name.startswith(IMAGE_TOKENIZER_PREFIX) or name in DERIVED_KEYS:
            continue
        kept[name] = value
    return kept


def detect_layout(weights: Mapping[str, torch.Tensor], config: DALLEConfig) -> Layout:
    """The layout whose names are exactly the transformer entries of ``weights``; CheckpointError naming the
    differences (and any option the names suggest) when none is."""
    present = set(transformer_weights(weights))
    for layout in LAYOUTS:
        if set(dalle_pytorch_key_plan(config, layout)) == present:
            return layout
    best = min(LAYOUTS, key=lambda layout: len(set(dalle_pytorch_key_plan(config, layout)) ^ present))
    expected = set(dalle_pytorch_key_plan(config, best))
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    message = (
        f"weights do not match DALLE-pytorch's DALLE for these hparams: missing {_some(missing)}, "
        f"unexpected {_some(unexpected)}"
    )
    hint = _option_hint(present, config)
    raise CheckpointError(message + (f"; {hint}" if hint else ""))


def _some(names: list[str], limit: int = 4) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _option_hint(present: set[str], config: DALLEConfig) -> str:
    """Which single option flip would make the names match (hparams that disagree with the weights)."""
    for name in ("shift_tokens", "rotary_emb", "sandwich_norm", "reversible", "share_input_output_emb"):
        flipped: dict[str, Any] = {name: not getattr(config, name)}
        try:
            variant = dataclasses.replace(config, **flipped)
        except ConfigError:
            continue
        if any(set(dalle_pytorch_key_plan(variant, layout)) == present for layout in LAYOUTS):
            return (
                f"the weights are those of {name}={not getattr(config, name)} but the hparams give "
                f"{getattr(config, name)} (a missing shift_tokens or rotary_emb hparam is read as False)"
            )
    return ""


def convert_dalle_pytorch_weights(weights: Mapping[str, Any], config: DALLEConfig) -> dict[str, torch.Tensor]:
    """Our state dict (float32) for DALLE-pytorch ``weights`` of a model with ``config`` (from
    :func:`config_from_dalle_pytorch`). Strict: any missing, unexpected or mis-shaped entry raises CheckpointError.
    """
    if not config.layer_scale or config.ff_activation != "geglu" or config.architecture != "decoder_only":
        raise ConfigError(
            "convert_dalle_pytorch_weights: expected a config from config_from_dalle_pytorch (layer_scale=True, "
            f"ff_activation='geglu', decoder_only), got layer_scale={config.layer_scale}, "
            f"ff_activation={config.ff_activation!r}, architecture={config.architecture!r}"
        )
    theirs = transformer_weights(weights)
    plan = dalle_pytorch_key_plan(config, detect_layout(theirs, config))
    with torch.device("meta"):
        expected = DALLE(config).state_dict()
    ours: dict[str, torch.Tensor] = {}
    for name, rule in plan.items():
        tensor = theirs[name].detach().to(device="cpu", dtype=torch.float32)
        if rule.how == "same":
            other = theirs[rule.target].detach().to(device="cpu", dtype=torch.float32)
            if tensor.shape != other.shape or not torch.equal(tensor, other):
                raise CheckpointError(f"weights: {name} should be the same tensor as {rule.target} but differs")
        elif rule.how == "rotary":
            _check_rotary_table(tensor, config)
        else:
            ours[rule.target] = _reshape(name, tensor, rule, expected[rule.target].shape, config)
    # BOS is their text id 0 at position 0: its embedding row plus (learned positions) position 0.
    text_table = theirs["to_logits.1.weight" if config.share_input_output_emb else "text_emb.weight"].float()
    bos = text_table[0].clone()
    if not config.rotary_emb:
        bos += theirs["text_pos_emb.weight"].float()[0]
    ours["bos"] = bos
    if set(ours) != set(expected):  # the plan covers every parameter of ours by construction
        raise CheckpointError(f"internal: converted names differ from the model's: {sorted(set(ours) ^ set(expected))}")
    return ours


def _reshape(name: str, tensor: torch.Tensor, rule: KeyRule, shape: torch.Size, config: DALLEConfig) -> torch.Tensor:
    """Their tensor in our shape, after checking it has the shape DALLE-pytorch gives it for these hparams."""
    rows, dim = (shape[0], shape[-1]) if len(shape) == 2 else (0, shape[-1])
    raw_shape = {
        "copy": tuple(shape),
        "scale": (1, 1, dim),
        "rows": (1, rows, 1, dim),
        "cols": (1, 1, rows, dim),
        "text_pos": (rows + 1, dim),
    }[rule.how]
    if tuple(tensor.shape) != raw_shape:
        hint = ""
        if name == "text_emb.weight" and tuple(tensor.shape) == (config.num_text_tokens, config.dim):
            hint = " (checkpoints before DALLE-pytorch 0.9 masked text padding instead; they cannot be imported)"
        raise CheckpointError(
            f"weights: {name} has shape {list(tensor.shape)}, expected {list(raw_shape)} for these hparams "
            f"(num_text_tokens={config.num_text_tokens}, text_seq_len={config.text_seq_len}, "
            f"num_image_tokens={config.num_image_tokens}, image_fmap_size={config.image_fmap_size}, dim={config.dim})"
            + hint
        )
    if rule.how == "scale":
        return tensor.reshape(dim).clone()
    if rule.how == "rows":
        return tensor[0, :, 0].clone()
    if rule.how == "cols":
        return tensor[0, 0].clone()
    if rule.how == "text_pos":
        return tensor[1:].clone()
    return tensor.clone()


def _check_rotary_table(table: torch.Tensor, config: DALLEConfig) -> None:
    """Their stored rotary angles must be ours: ``[1, L + 1, R]``, or ``[1, 1, L, R]`` before November 2021 (their
    last position dropped; ``L = total_seq_len``)."""
    expected = rotary_angles(config.text_seq_len, config.image_fmap_size, config.dim_head)
    length, width = expected.shape
    if tuple(table.shape) == (1, length, width):
        stored = table[0]
    elif tuple(table.shape) == (1, 1, length - 1, width):
        stored, expected = table[0, 0], expected[:-1]
    else:
        raise CheckpointError(
            f"weights: {ROTARY_KEY} has shape {list(table.shape)}, expected [1, {length}, {width}] for these hparams "
            f"(text_seq_len={config.text_seq_len}, image_fmap_size={config.image_fmap_size}, "
            f"dim_head={config.dim_head})"
        )
    if not torch.allclose(stored, expected, rtol=1e-5, atol=1e-4):
        difference = float((stored - expected).abs().max())
        raise CheckpointError(
            f"weights: the rotary angles in {ROTARY_KEY} differ from DALLE-pytorch 1.6.6's by up to {difference:.3g}; "
            "this checkpoint's rotary embedding is not the one implemented here"
        )
