"""Against the real DALLE-pytorch 1.6.6: its models, saved as train_dalle.py saves them, import with equal logits.

Runs only where ``dalle_pytorch`` is installed (``nox -s dalle_pytorch_parity``: ``dalle-pytorch==1.6.6 --no-deps``
beside its runtime dependencies); skipped otherwise. Its ``vae.py`` imports taming-transformers at import time, which
these tests do not use: a placeholder module stands in while importing, and is removed afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import sys
import types
import warnings
from collections.abc import Iterator

import pytest
import torch
from test_dalle_pytorch_reference import Spec, module_chain

from dalle_transformer import DALLE, config_from_dalle_pytorch, convert_dalle_pytorch_weights

MIXED = ("full", "axial_row", "axial_col", "conv_like")
BASE = dict(num_text_tokens=30, text_seq_len=5, dim=32, depth=2, heads=2, dim_head=16)
# As train_dalle.py writes hparams: every option named, 1.6.6's command-line defaults.
TRAIN_DALLE_HPARAMS = dict(
    reversible=False,
    loss_img_weight=7,
    attn_types=("full",),
    ff_dropout=0.0,
    attn_dropout=0.0,
    stable=False,
    shift_tokens=False,
    rotary_emb=False,
    shared_attn_ids=None,
    shared_ff_ids=None,
    share_input_output_emb=False,
)
CASES = {
    "plain": {},
    "mixed_attention": dict(attn_types=MIXED, depth=4),
    "rotary": dict(rotary_emb=True),
    "shift_tokens": dict(shift_tokens=True),
    "sandwich_norm": dict(sandwich_norm=True),  # not a train_dalle.py option; DALLE(sandwich_norm=True) in code
    "stable": dict(stable=True),
    "reversible": dict(reversible=True),
    "shared_layers": dict(depth=3, shared_attn_ids=("a", "a", "b"), shared_ff_ids=("0", "1", "1")),
    "share_input_output_emb": dict(share_input_output_emb=True),
    "optimize_for_inference": dict(attn_types=("axial_row", "axial_col"), optimize_for_inference=True),
    "everything": dict(
        depth=4,
        attn_types=MIXED,
        rotary_emb=True,
        shift_tokens=True,
        sandwich_norm=True,
        stable=True,
        reversible=True,
        shared_attn_ids=(0, 1, 2, 3, 0, 1, 2, 3),
        share_input_output_emb=True,
    ),
}


@pytest.fixture(scope="module")
def dalle_pytorch() -> Iterator[types.ModuleType]:
    if importlib.util.find_spec("dalle_pytorch") is None:
        pytest.skip("dalle-pytorch is not installed (see nox -s dalle_pytorch_parity)")
    placeholders = []
    if importlib.util.find_spec("taming") is None:  # imported by dalle_pytorch.vae, unused here
        for name in ("taming", "taming.models", "taming.models.vqgan"):
            sys.modules[name] = types.ModuleType(name)
            placeholders.append(name)
        vqgan = sys.modules["taming.models.vqgan"]
        vqgan.VQModel = type("VQModel", (), {})  # type: ignore[attr-defined]
        vqgan.GumbelVQ = type("GumbelVQ", (), {})  # type: ignore[attr-defined]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module("dalle_pytorch")
    finally:
        for name in placeholders:
            sys.modules.pop(name, None)
    if module.__version__ != "1.6.6":
        pytest.skip(f"these tests pin DALLE-pytorch 1.6.6, found {module.__version__}")
    yield module


def real_model(dalle_pytorch: types.ModuleType, hparams: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    vae_params = dict(image_size=16, num_layers=2, num_tokens=20, codebook_dim=8, hidden_dim=8)
    model = dalle_pytorch.DALLE(vae=dalle_pytorch.DiscreteVAE(**vae_params), **hparams).eval()
    with torch.no_grad():  # O(1) random weights everywhere (LayerScale's 0.1 would hide most of each layer)
        for name, parameter in model.named_parameters():
            if not name.startswith("vae."):
                parameter.normal_(0.0, 0.4)
    return model


def save_like_train_dalle(dalle_pytorch: types.ModuleType, model: torch.nn.Module, hparams: dict) -> bytes:
    """train_dalle.py's save_model(): hparams, vae_params, epoch, version, vae_class_name, weights, optimizer."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    save_obj = {
        "hparams": hparams,
        "vae_params": dict(image_size=16, num_layers=2, num_tokens=20, codebook_dim=8, hidden_dim=8),
        "epoch": 2,
        "version": dalle_pytorch.__version__,
        "vae_class_name": type(model.vae).__name__,
        "weights": model.state_dict(),
        "opt_state": optimizer.state_dict(),
        "scheduler_state": None,
    }
    buffer = io.BytesIO()
    torch.save(save_obj, buffer)
    return buffer.getvalue()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1, 30, (2, 5), generator=generator)
    text[0, 3:] = 0
    text[1, 1] = 0
    return text, torch.randint(0, 20, (2, 16), generator=generator)


def assert_same_logits(real: torch.nn.Module, checkpoint: dict) -> None:
    config = config_from_dalle_pytorch(checkpoint["hparams"], 4, 20, version=checkpoint.get("version"))
    ours = DALLE(config).eval()
    ours.load_state_dict(convert_dalle_pytorch_weights(checkpoint["weights"], config), strict=True)
    text, image = batch()
    with torch.no_grad():
        theirs = real(text.clone(), image)  # [B, T + N, text vocab + image vocab], masked
        output = ours(text, image)
    vocab = config.num_text_logits
    torch.testing.assert_close(output.text_logits, theirs[:, :5, :vocab], rtol=0, atol=1e-4)
    torch.testing.assert_close(output.image_logits, theirs[:, 5:, vocab:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_train_dalle_checkpoints_give_dalle_pytorchs_logits(dalle_pytorch: types.ModuleType, case: str) -> None:
    hparams = {**BASE, **TRAIN_DALLE_HPARAMS, **CASES[case]}
    model = real_model(dalle_pytorch, hparams)
    checkpoint = torch.load(io.BytesIO(save_like_train_dalle(dalle_pytorch, model, hparams)), weights_only=True)
    assert_same_logits(model, checkpoint)


@pytest.mark.parametrize("options", [{}, dict(shift_tokens=True, attn_types=("full", "axial_row", "axial_col"))])
def test_pre_2022_names_of_the_same_model(dalle_pytorch: types.ModuleType, options: dict) -> None:
    """The same weights under the names DALLE-pytorch < 1.4 gave them (fewer wrappers, axial weights_0/1), with the
    hparams of the time (no shift_tokens / rotary_emb unless set, no version)."""
    hparams = {**BASE, "shift_tokens": False, "rotary_emb": False, **options}
    model = real_model(dalle_pytorch, hparams)
    spec = Spec({**BASE, **options})
    renamed = {}
    for name, tensor in model.state_dict().items():
        for layer in range(spec.depth):
            for branch, index in (("attn", 0), ("ff", 1)):
                prefix = f"transformer.layers.layers.{layer}.{index}."
                new = prefix + "fn." * len(module_chain(branch, spec.shift_tokens, wrapped=True))
                old = prefix + "fn." * len(module_chain(branch, spec.shift_tokens, wrapped=False))
                if name.startswith(new):
                    name = old + name[len(new) :]
        renamed[name.replace("image_pos_emb.weights.", "image_pos_emb.weights_")] = tensor
    old_hparams = {key: value for key, value in hparams.items() if key in BASE or key in options}
    assert_same_logits(model, {"hparams": old_hparams, "weights": renamed})
