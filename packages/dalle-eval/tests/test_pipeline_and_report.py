from __future__ import annotations

import json
import re

import pytest
import torch

from dalle_core.errors import DalleError
from dalle_eval.pipeline import SamplingOptions, generate, write_generation
from dalle_eval.report import write_report
from dalle_tokenizers import SimpleTokenizer
from dalle_train.bundle import Bundle, load_bundle, save_bundle
from dalle_transformer import DALLE, DALLEConfig
from dalle_vae import DiscreteVAE, DiscreteVAEConfig


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(0)
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8))
    tokenizer = SimpleTokenizer()
    config = DALLEConfig(
        num_text_tokens=257,
        text_seq_len=12,
        num_image_tokens=16,
        image_fmap_size=4,
        dim=32,
        depth=1,
        heads=2,
        dim_head=16,
    )
    save_bundle(tmp_path / "model", DALLE(config), tokenizer, vae.eval())
    return load_bundle(tmp_path / "model")


def test_generation_is_seeded_and_decoded(bundle: Bundle):
    options = SamplingOptions(top_k=4, seed=3, batch_size=2)
    first = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=options)
    again = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=options)
    assert first.prompts == ("a red one",) * 3 + ("a blue one",) * 3
    assert torch.equal(first.image_ids, again.image_ids) and torch.equal(first.images, again.images)
    assert first.images.shape == (6, 3, 16, 16)
    assert torch.allclose(first.images, bundle.image_tokenizer.decode(first.image_ids))
    other = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=SamplingOptions(top_k=4, seed=4))
    assert not torch.equal(first.image_ids, other.image_ids)


def test_bad_requests(bundle: Bundle):
    with pytest.raises(DalleError, match="at least one prompt"):
        generate(bundle, [])
    with pytest.raises(DalleError, match="temperature must be positive, got 0"):
        SamplingOptions(temperature=0)
    with pytest.raises(DalleError, match="text .* is 40 tokens long, more than the context length 12"):
        generate(bundle, ["x" * 40])


def test_files_and_report(bundle: Bundle, tmp_path):
    generation = generate(bundle, ["one", "two"], n_per_prompt=2, options=SamplingOptions(seed=1))
    paths = write_generation(generation, tmp_path / "out", scale=2)
    sidecar = json.loads((tmp_path / "out" / "generations.json").read_text())
    assert [r["prompt"] for r in sidecar["images"]] == ["one", "one", "two", "two"]
    assert sidecar["options"]["seed"] == 1 and all(p.is_file() for p in paths)
    page = write_report(
        tmp_path / "out",
        "t <&>",
        [("one", paths[:2], "ok"), ("two", paths[2:], "")],
        {"a": {"b": 0.5}},
        grid=tmp_path / "out" / "grid.png",
    )
    text = page.read_text()
    assert "t &lt;&amp;&gt;" in text and "<th>a.b</th><td>0.5</td>" in text
    sources = re.findall(r'src="([^"]+)"', text)
    assert sources == ["images/0000.png", "images/0001.png", "images/0002.png", "images/0003.png", "grid.png"]
    assert all((tmp_path / "out" / s).is_file() for s in sources)
