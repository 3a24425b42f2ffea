"""Parity with taming-transformers itself (``taming`` extra: taming-transformers-rom1504 0.0.6).

The same tiny random-weight checkpoint is loaded into taming's ``VQModel``/``GumbelVQ`` (strictly) and into ours;
codes and decoded images must be equal, computed the way DALLE-pytorch's ``VQGanVAE`` wrapper calls taming.
Skipped when taming is not installed: ``uv sync --package dalle-vae --group test --extra taming``.

taming 0.0.6 imports ``pytorch_lightning.utilities.distributed``, which Lightning 2 removed; this module provides
that one submodule (``rank_zero_only``, all taming takes from it) while importing taming, then removes it again.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from vqgan_files import write_taming_files

from dalle_vae import VQGanVAE

lightning_utilities = pytest.importorskip("pytorch_lightning.utilities", reason="the reference needs the taming extra")
pytest.importorskip("taming", reason="the reference needs the taming extra")

_SHIM = "pytorch_lightning.utilities.distributed"
with contextlib.ExitStack() as _cleanup:
    if _SHIM not in sys.modules:
        try:
            __import__(_SHIM)
        except ImportError:
            shim = types.ModuleType(_SHIM)
            shim.rank_zero_only = lightning_utilities.rank_zero_only  # type: ignore[attr-defined]
            sys.modules[_SHIM] = shim
            _cleanup.callback(sys.modules.pop, _SHIM, None)
    from taming.models.vqgan import GumbelVQ, VQModel


def _reference(config_path: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    params = yaml.safe_load(config_path.read_text())["model"]["params"]
    model = (GumbelVQ if "temperature_scheduler_config" in params else VQModel)(**params)
    model.load_state_dict(state, strict=True)  # our key list is exactly taming's
    return model.eval()


def _dalle_pytorch_decode(reference: torch.nn.Module, ids: torch.Tensor, gumbel: bool) -> torch.Tensor:
    """DALLE-pytorch's VQGanVAE.decode: one-hot codes times the codebook, taming's decode, [-1, 1] -> [0, 1]."""
    codebook = reference.quantize.embed.weight if gumbel else reference.quantize.embedding.weight
    vectors = F.one_hot(ids, num_classes=codebook.shape[0]).float() @ codebook
    side = int(ids.shape[1] ** 0.5)
    vectors = vectors.view(ids.shape[0], side, side, -1).permute(0, 3, 1, 2)
    return (reference.decode(vectors).clamp(-1.0, 1.0) + 1) * 0.5


@pytest.mark.parametrize("gumbel", [False, True], ids=["VQModel", "GumbelVQ"])
def test_encode_and_decode_match_taming_exactly(tmp_path: Path, gumbel: bool) -> None:
    checkpoint, config_path, state = write_taming_files(tmp_path, gumbel=gumbel)
    reference = _reference(config_path, state)
    ours = VQGanVAE.from_taming(checkpoint, config_path)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if gumbel:
            # taming samples Gumbel noise even in eval mode; the noise-free codes are the argmax of its logits.
            logits = reference.quantize.proj(reference.encode_to_prequant(2 * images - 1))
            expected_ids = logits.argmax(dim=1).flatten(1)
        else:
            _, _, (_, _, indices) = reference.encode(2 * images - 1)
            expected_ids = indices.view(3, -1)
        ids = ours.encode(images)
        assert torch.equal(ids, expected_ids)
        assert len(ids.unique()) > 5  # the weights spread codes around: the comparison is not trivial
        random_ids = torch.randint(0, 48, ids.shape, generator=torch.Generator().manual_seed(1))
        for codes in (ids, random_ids):
            expected = _dalle_pytorch_decode(reference, codes, gumbel)
            assert torch.equal(ours.decode(codes), expected)
        assert expected.std() > 0.01


def test_gumbel_sampling_matches_taming_with_the_same_seed(tmp_path: Path) -> None:
    checkpoint, config_path, state = write_taming_files(tmp_path, gumbel=True)
    reference = _reference(config_path, state)
    ours = VQGanVAE.from_taming(checkpoint, config_path)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(3)
        _, _, (_, _, sampled) = reference.quantize(reference.encode_to_prequant(2 * images - 1))
    torch.manual_seed(3)
    assert torch.equal(ours.encode(images, sample=True), sampled.flatten(1))
    assert not torch.equal(sampled.flatten(1), ours.encode(images))
