"""A DALLE-pytorch ``dalle.pt`` (``train_dalle.py``'s output) as one of our bundles (``dalle checkpoint import``).

The transformer comes from ``hparams`` and ``weights`` (:mod:`dalle_transformer.dalle_pytorch`), the image tokenizer
from the VAE the checkpoint was trained with, the text tokenizer from the file DALLE-pytorch was given:

- ``DiscreteVAE``: rebuilt from ``vae_params`` and the ``vae.*`` weights saved with the transformer.
- ``OpenAIDiscreteVAE``: OpenAI's ``encoder.pkl`` / ``decoder.pkl`` from ``openai_dir`` when given, else the copy
  of their weights that DALLE-pytorch saved under ``vae.enc.`` / ``vae.dec.``, else DALLE-pytorch's download cache.
- ``VQGanVAE``: the taming model's ``.yaml`` (``taming_config``, default: DALLE-pytorch's cached
  ``vqgan.1024.config.yml``) with the weights of ``taming_checkpoint`` when given, else the copy saved under
  ``vae.model.`` (the training-only ``loss.*`` entries dropped). Images are 256 px, as DALLE-pytorch fixed them.
- Text: ``bpe_path`` ending in ``.json`` is a Hugging Face tokenizer (DALLE-pytorch's ``--hug``), another file a
  YouTokenToMe model; without it, CLIP's BPE (DALLE-pytorch's default tokenizer), whose vocabulary comes from
  ``clip_vocab`` or the installed ``open-clip-torch``. Each without special tokens and padded with id 0, as
  DALLE-pytorch encodes text.

The file is read with ``torch.load(weights_only=True)``; objects beyond tensors and plain containers are read as
inert stand-ins (no code runs), and if the parts needed here hold any, the error explains ``trust_pickle``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dalle_core.errors import CheckpointError, ConfigError, MissingExtraError
from dalle_core.protocols import ImageTokenizer, TextTokenizer
from dalle_transformer import DALLE, config_from_dalle_pytorch, convert_dalle_pytorch_weights
from dalle_transformer.dalle_pytorch import detect_layout

VAE_CLASSES = ("DiscreteVAE", "OpenAIDiscreteVAE", "VQGanVAE")
TRUST_HINT = (
    "if you trust the file, pass --trust-pickle (trust_pickle=True) to unpickle it fully, which runs code stored in it"
)
# Where DALLE-pytorch keeps its default VQGAN (ImageNet f16, 1024 codes) after downloading it.
DEFAULT_VQGAN_CHECKPOINT = "vqgan.1024.model.ckpt"
DEFAULT_VQGAN_CONFIG = "vqgan.1024.config.yml"
CLIP_VOCAB_HELP = (
    "DALLE-pytorch's default text tokenizer is CLIP's BPE: pass its vocabulary with --clip-vocab FILE (DALLE-pytorch "
    "ships it as dalle_pytorch/data/bpe_simple_vocab_16e6.txt) or install open-clip-torch "
    "(uv pip install 'dalle-tokenizers[clip]'); a model trained with --bpe_path needs that file as --bpe-path"
)


@dataclass(frozen=True)
class DallePytorchCheckpoint:
    """The parts of a ``dalle.pt`` the import uses (``version`` / ``vae_class_name`` only since December 2021)."""

    path: Path
    hparams: dict[str, Any]
    vae_params: dict[str, Any] | None
    weights: dict[str, torch.Tensor]
    vae_class_name: str | None
    version: str | None
    epoch: int | None

    def vae_weights(self) -> dict[str, torch.Tensor]:
        """The image tokenizer's weights saved with the transformer (``vae.`` prefix removed)."""
        return {name[4:]: tensor for name, tensor in self.weights.items() if name.startswith("vae.")}


def read_dalle_pytorch_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> DallePytorchCheckpoint:
    """Read a DALLE-pytorch ``dalle.pt`` without running code from it (unless ``trust_pickle``)."""
    from dalle_vae.pickles import load_torch_file

    path = Path(path)
    data = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(data, dict) or "hparams" not in data or "weights" not in data:
        found = sorted(map(str, data))[:6] if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path}: expected a DALLE-pytorch dalle.pt with 'hparams' and 'weights' (train_dalle.py's output), "
            f"found {found}"
        )
    weights = data["weights"]
    if isinstance(weights, str):
        raise CheckpointError(
            f"{path}: this is the auxiliary file of a DeepSpeed checkpoint, without weights; consolidate the ZeRO "
            "checkpoint into a single dalle.pt first (DALLE-pytorch wiki: DeepSpeed Checkpoints)"
        )
    hparams = _plain(data["hparams"], path, "hparams")
    vae_params = _plain(data.get("vae_params"), path, "vae_params")
    weights = _plain(weights, path, "weights")
    for name, what in (("hparams", hparams), ("weights", weights)):
        if not isinstance(what, Mapping):
            raise CheckpointError(f"{path}: {name} should be a dict, got {type(what).__name__}")
    if vae_params is not None and not isinstance(vae_params, Mapping):
        raise CheckpointError(f"{path}: vae_params should be a dict or None, got {type(vae_params).__name__}")
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: weights entry {name!r} is not a named tensor")
    vae_class_name = _plain(data.get("vae_class_name"), path, "vae_class_name")
    version = _plain(data.get("version"), path, "version")
    epoch = _plain(data.get("epoch"), path, "epoch")
    return DallePytorchCheckpoint(
        path=path,
        hparams=dict(hparams),
        vae_params=None if vae_params is None else dict(vae_params),
        weights=dict(weights),
        vae_class_name=vae_class_name if isinstance(vae_class_name, str) else None,
        version=str(version) if version is not None else None,
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
    )


def _plain(value: Any, path: Path, what: str) -> Any:
    """``value`` if it holds no stand-in for an unpickled object (see ``dalle_vae.pickles``), else CheckpointError."""
    from dalle_vae.pickles import PickledObject

    stack, seen = [value], 0
    while stack and seen < 1_000_000:
        item = stack.pop()
        seen += 1
        if isinstance(item, PickledObject):
            raise CheckpointError(
                f"{path}: {what} holds a pickled {item.pickled_name} object, which plain-data loading does not "
                f"rebuild; {TRUST_HINT}"
            )
        if isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return value


# ---------------------------------------------------------------------------------------------- image tokenizer


def vae_class(checkpoint: DallePytorchCheckpoint) -> str:
    """Which of DALLE-pytorch's VAE classes the model was trained with: recorded since December 2021, otherwise
    read from ``vae_params`` (DiscreteVAE) or the names of the saved VAE weights."""
    name = checkpoint.vae_class_name
    if name is not None and name not in VAE_CLASSES:
        raise CheckpointError(
            f"{checkpoint.path}: unknown vae_class_name {name!r}; expected one of {list(VAE_CLASSES)}"
        )
    if checkpoint.vae_params is not None:
        if name not in (None, "DiscreteVAE"):
            raise CheckpointError(f"{checkpoint.path}: vae_params are set but vae_class_name is {name!r}")
        return "DiscreteVAE"
    if name == "DiscreteVAE":
        raise CheckpointError(f"{checkpoint.path}: vae_class_name is DiscreteVAE but vae_params are missing")
    if name is not None:
        return name
    top_level = {key.split(".", 1)[0] for key in checkpoint.vae_weights()}
    if {"enc", "dec"} & top_level:
        return "OpenAIDiscreteVAE"
    if "model" in top_level:
        return "VQGanVAE"
    raise CheckpointError(
        f"{checkpoint.path}: cannot tell which VAE the model was trained with (no vae_params, vae_class_name or VAE "
        "weights in the file)"
    )


def build_image_tokenizer(
    checkpoint: DallePytorchCheckpoint,
    *,
    openai_dir: Path | None = None,
    taming_checkpoint: Path | None = None,
    taming_config: Path | None = None,
    trust_pickle: bool = False,
) -> ImageTokenizer:
    """Our image tokenizer equal to the VAE the checkpoint was trained with (see the module docstring)."""
    kind = vae_class(checkpoint)
    given = {
        "--openai-dir": (openai_dir, "OpenAIDiscreteVAE"),
        "--taming-checkpoint": (taming_checkpoint, "VQGanVAE"),
        "--taming-config": (taming_config, "VQGanVAE"),
    }
    for option, (value, needed) in given.items():
        if value is not None and kind != needed:
            raise ConfigError(f"{option} is for a model trained with {needed}, but this checkpoint's VAE is {kind}")
    if kind == "DiscreteVAE":
        from dalle_vae import discrete_vae_from_dalle_pytorch

        assert checkpoint.vae_params is not None  # vae_class says so
        return discrete_vae_from_dalle_pytorch(
            checkpoint.vae_params, checkpoint.vae_weights(), f"{checkpoint.path} (its DiscreteVAE)"
        )
    if kind == "OpenAIDiscreteVAE":
        return _openai_dvae(checkpoint, openai_dir)
    return _vqgan(checkpoint, taming_checkpoint, taming_config, trust_pickle)


def _openai_dvae(checkpoint: DallePytorchCheckpoint, openai_dir: Path | None) -> ImageTokenizer:
    from dalle_vae import OpenAIDiscreteVAE

    saved = checkpoint.vae_weights()
    if openai_dir is not None:
        if not openai_dir.exists():
            raise CheckpointError(f"--openai-dir not found: {openai_dir} (expected encoder.pkl and decoder.pkl in it)")
        return OpenAIDiscreteVAE.from_openai_pickles(openai_dir, image_size=256)
    if saved:
        return _openai_dvae_from_state(saved, checkpoint.path)
    try:
        return OpenAIDiscreteVAE.from_openai_pickles(None, image_size=256)
    except CheckpointError as error:
        raise CheckpointError(
            f"{checkpoint.path} was trained with OpenAI's dVAE and holds no copy of its weights: pass --openai-dir DIR "
            f"holding encoder.pkl and decoder.pkl ({error})"
        ) from None


def _openai_dvae_from_state(saved: Mapping[str, torch.Tensor], path: Path) -> ImageTokenizer:
    """OpenAI's dVAE from DALLE-pytorch's saved copy (``enc.*`` / ``dec.*``, ``dall_e`` names with ``w``/``b``);
    its sizes are read from the tensors' shapes."""
    from dalle_vae import OpenAIDiscreteVAE, OpenAIDVAEConfig
    from dalle_vae.directory import load_state_strictly

    state: dict[str, torch.Tensor] = {}
    for name, tensor in saved.items():
        network, _, rest = name.partition(".")
        stem, _, leaf = rest.rpartition(".")
        if network not in ("enc", "dec") or leaf not in ("w", "b"):
            raise CheckpointError(f"{path}: unexpected OpenAI dVAE weight vae.{name}")
        ours = {"enc": "encoder", "dec": "decoder"}[network]
        state[f"{ours}.{stem}.{'weight' if leaf == 'w' else 'bias'}"] = tensor.float()

    def shape(name: str) -> torch.Size:
        if name not in state:
            raise CheckpointError(f"{path}: the saved OpenAI dVAE lacks {name}")
        return state[name].shape

    def blocks_per_group(network: str) -> int:
        prefix = f"{network}.blocks.group_1."
        return len({name[len(prefix) :].split(".", 1)[0] for name in state if name.startswith(prefix)})

    try:
        config = OpenAIDVAEConfig(
            image_size=256,  # DALLE-pytorch's OpenAIDiscreteVAE
            channels=shape("encoder.blocks.input.weight")[1],
            vocab_size=shape("encoder.blocks.output.conv.weight")[0],
            encoder_hidden=shape("encoder.blocks.input.weight")[0],
            encoder_blocks_per_group=blocks_per_group("encoder"),
            decoder_init=shape("decoder.blocks.input.weight")[0],
            decoder_hidden=shape("decoder.blocks.output.conv.weight")[1],
            decoder_blocks_per_group=blocks_per_group("decoder"),
        )
    except ConfigError as error:
        raise CheckpointError(f"{path}: the saved OpenAI dVAE has unexpected shapes ({error})") from None
    model = OpenAIDiscreteVAE(config)
    load_state_strictly(model, state, f"{path} (its OpenAI dVAE)")
    return model.eval()


def _vqgan(
    checkpoint: DallePytorchCheckpoint, ckpt: Path | None, config: Path | None, trust_pickle: bool
) -> ImageTokenizer:
    from dalle_vae import VQGanVAE
    from dalle_vae.directory import load_state_strictly
    from dalle_vae.openai_dvae import default_cache_dir
    from dalle_vae.vqgan import read_taming_yaml

    config = config if config is not None else default_cache_dir() / DEFAULT_VQGAN_CONFIG
    if not config.is_file():
        raise CheckpointError(
            f"{checkpoint.path} was trained with a taming VQGAN: pass the model's config with --taming-config "
            f"FILE.yaml ({config} not found)"
        )
    saved = {name[len("model.") :]: t for name, t in checkpoint.vae_weights().items() if name.startswith("model.")}
    if ckpt is not None:
        model = VQGanVAE.from_taming(ckpt, config, image_size=256, trust_pickle=trust_pickle)
    elif saved:
        model = VQGanVAE(read_taming_yaml(config, image_size=256))
        state = {name: tensor.float() for name, tensor in saved.items() if not name.startswith("loss.")}
        load_state_strictly(model, state, f"{checkpoint.path} (its VQGAN, with {config})")
    else:
        default = default_cache_dir() / DEFAULT_VQGAN_CHECKPOINT
        if not default.is_file():
            raise CheckpointError(
                f"{checkpoint.path} holds no copy of its VQGAN's weights: pass --taming-checkpoint FILE.ckpt "
                f"({default} not found)"
            )
        model = VQGanVAE.from_taming(default, config, image_size=256, trust_pickle=trust_pickle)
    # DALLE-pytorch sized its transformer with 256 / 2 ** log2(resolution / attn_resolutions[0]), not the real grid.
    settings = model.config
    their_layers = int(math.log(settings.resolution / settings.attn_resolutions[0]) / math.log(2))
    if 256 // 2**their_layers != model.fmap_size:
        raise CheckpointError(
            f"{config}: DALLE-pytorch sized the transformer for a {256 // 2**their_layers}-token grid (from "
            f"resolution / attn_resolutions[0]), but this VQGAN makes a {model.fmap_size}x{model.fmap_size} grid"
        )
    return model.eval()


# ---------------------------------------------------------------------------------------------- text tokenizer


def build_text_tokenizer_for(
    num_text_tokens: int, *, bpe_path: Path | None = None, clip_vocab: Path | None = None
) -> TextTokenizer:
    """The text tokenizer DALLE-pytorch used, encoding as it did (no special tokens, padding id 0)."""
    from dalle_tokenizers import build_text_tokenizer

    if bpe_path is not None and clip_vocab is not None:
        raise ConfigError("give --bpe-path (a model trained with --bpe_path) or --clip-vocab (CLIP's BPE), not both")
    if bpe_path is not None:
        if not bpe_path.is_file():
            raise ConfigError(f"--bpe-path not found: {bpe_path}")
        if bpe_path.suffix == ".json":
            tokenizer = build_text_tokenizer("hf", bpe_path, add_special_tokens=False, pad_id=0)
        else:
            tokenizer = build_text_tokenizer("yttm", bpe_path, pad_id=0)
        source = str(bpe_path)
    else:
        try:
            tokenizer = build_text_tokenizer("clip-bpe", clip_vocab, add_special_tokens=False, pad_id=0)
        except MissingExtraError:
            raise ConfigError(CLIP_VOCAB_HELP) from None
        source = "CLIP's BPE"
    if tokenizer.vocab_size != num_text_tokens:
        raise ConfigError(
            f"the text tokenizer ({source}) has {tokenizer.vocab_size} ids but the checkpoint's num_text_tokens is "
            f"{num_text_tokens}: pass the tokenizer the model was trained with (--bpe-path: DALLE-pytorch's "
            "--bpe_path file, a Hugging Face .json or a YouTokenToMe .model; for --chinese models, "
            "bert-base-chinese's tokenizer.json)"
        )
    return tokenizer


# ---------------------------------------------------------------------------------------------- the whole import


def import_dalle_pytorch(
    dalle_pt: str | Path,
    output: str | Path,
    *,
    bpe_path: str | Path | None = None,
    clip_vocab: str | Path | None = None,
    openai_dir: str | Path | None = None,
    taming_checkpoint: str | Path | None = None,
    taming_config: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Write a bundle for ``dalle generate --checkpoint OUTPUT`` from a DALLE-pytorch ``dalle.pt``; return OUTPUT.

    ``output`` (new, empty, or a bundle) is replaced atomically. Options: see the module docstring. Every problem
    raises a ``dalle_core.errors`` error naming what is missing or wrong; nothing is written then.
    """
    from dalle_train.bundle import save_bundle

    output = Path(output)
    if output.exists() and not _replaceable(output):
        raise ConfigError(
            f"output {output} exists and is not a dalle bundle: refusing to replace it (give a new or empty "
            "directory, or an earlier import to overwrite)"
        )
    checkpoint = read_dalle_pytorch_checkpoint(dalle_pt, trust_pickle=trust_pickle)
    image_tokenizer = build_image_tokenizer(
        checkpoint,
        openai_dir=_path(openai_dir),
        taming_checkpoint=_path(taming_checkpoint),
        taming_config=_path(taming_config),
        trust_pickle=trust_pickle,
    )
    try:
        config = config_from_dalle_pytorch(
            checkpoint.hparams, image_tokenizer.fmap_size, image_tokenizer.num_tokens, version=checkpoint.version
        )
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None
    text_tokenizer = build_text_tokenizer_for(
        config.num_text_tokens, bpe_path=_path(bpe_path), clip_vocab=_path(clip_vocab)
    )
    try:
        state = convert_dalle_pytorch_weights(checkpoint.weights, config)
        layout = detect_layout(checkpoint.weights, config)
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: {error}") from None
    model = DALLE(config)
    model.load_state_dict(state, strict=True)
    model.eval()
    provenance = {
        "imported_from": str(checkpoint.path),
        "dalle_pytorch": {
            "version": checkpoint.version,
            "epoch": checkpoint.epoch,
            "vae_class_name": vae_class(checkpoint),
            "layout": layout.describe(),
            "hparams": json.loads(json.dumps(checkpoint.hparams, default=str)),
        },
    }
    save_bundle(output, model, text_tokenizer, image_tokenizer, training_config=provenance)
    return output


def _replaceable(directory: Path) -> bool:
    """An empty directory, or a bundle (which the import replaces as a whole)."""
    if not directory.is_dir():
        return False
    is_bundle = (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    return is_bundle or not any(directory.iterdir())


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value).expanduser()
