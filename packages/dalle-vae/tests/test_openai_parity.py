"""Parity with the real ``dall_e`` package (PyPI ``DALL-E`` 0.1), run with the ``dall-e`` extra installed.

Tiny random-weight ``dall_e`` Encoder/Decoder modules are ``torch.save``d whole, as OpenAI did, then loaded through
our restricted unpickler; codes and images must equal what the package computes (the way DALLE-pytorch calls it).
Skipped when ``dall_e`` is not installed: ``uv sync --package dalle-vae --group test --extra dall-e``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dalle_vae import OpenAIDiscreteVAE

dall_e = pytest.importorskip("dall_e", reason="the reference needs the dall-e extra")


def _reference_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    # The smallest the package's validators allow: n_hid >= 64, vocab_size >= 512, n_init >= 8.
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    decoder = dall_e.Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=512)
    with torch.no_grad():
        for module in (encoder, decoder):
            for name, parameter in module.named_parameters():
                if name.endswith(".b"):  # biases start at zero; make them count
                    parameter.normal_(std=0.1)
    return encoder.eval(), decoder.eval()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_dall_e_package_exactly(tmp_path: Path, zip_format: bool) -> None:
    encoder, decoder = _reference_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(encoder, tmp_path / "encoder.pkl", _use_new_zipfile_serialization=zip_format)
        torch.save(decoder, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=zip_format)
    model = OpenAIDiscreteVAE.from_openai_pickles(tmp_path, image_size=32)
    assert model.config.encoder_hidden == 64 and model.config.decoder_init == 16 and model.num_tokens == 512

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_ids = torch.argmax(encoder.blocks(dall_e.map_pixels(images)), dim=1).flatten(1)
        random_ids = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(2))
        ids = model.encode(images)
        assert torch.equal(ids, expected_ids)
        for codes in (ids, random_ids):
            one_hot = F.one_hot(codes.view(3, 4, 4), num_classes=512).permute(0, 3, 1, 2).float()
            expected = dall_e.unmap_pixels(torch.sigmoid(decoder(one_hot).float()[:, :3]))
            assert torch.equal(model.decode(codes), expected)
