from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from dalle_core.errors import DalleError
from dalle_eval.pipeline import SamplingOptions, generate, image_seed, write_generation
from dalle_eval.report import write_report
from dalle_train.bundle import Bundle


def test_generation_is_seeded_and_decoded(bundle: Bundle):
    options = SamplingOptions(top_k=4, seed=3, batch_size=2)
    first = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=options)
    again = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=options)
    assert first.prompts == ("a red one",) * 3 + ("a blue one",) * 3
    assert first.prompt_indices == (0, 0, 0, 1, 1, 1) and first.sample_indices == (0, 1, 2, 0, 1, 2)
    assert torch.equal(first.image_ids, again.image_ids) and torch.equal(first.images, again.images)
    assert first.images.shape == (6, 3, 16, 16)
    assert torch.allclose(first.images, bundle.image_tokenizer.decode(first.image_ids))
    other = generate(bundle, ["a red one", "a blue one"], n_per_prompt=3, options=SamplingOptions(top_k=4, seed=4))
    assert not torch.equal(first.image_ids, other.image_ids)


def test_per_image_seeds_do_not_depend_on_batching_or_the_other_prompts(bundle: Bundle):
    prompts = ["a red one", "a blue one", "a green one"]
    base = generate(bundle, prompts, 3, SamplingOptions(seed=7, batch_size=2))
    bigger_batches = generate(bundle, prompts, 3, SamplingOptions(seed=7, batch_size=16))
    assert torch.equal(base.image_ids, bigger_batches.image_ids)
    # One prompt alone, fewer samples, other order: each image is the same as in the full run.
    alone = generate(bundle, ["a blue one"], 2, SamplingOptions(seed=7, batch_size=1))
    assert torch.equal(alone.image_ids, base.image_ids[3:5])
    reordered = generate(bundle, prompts[::-1], 3, SamplingOptions(seed=7))
    assert torch.equal(reordered.image_ids[:3], base.image_ids[6:9])
    # The recorded seed alone redraws an image through the transformer.
    text = bundle.text_tokenizer.encode(["a green one"], bundle.model.config.text_seq_len)
    redrawn = bundle.model.generate_image_ids(text, generator=torch.Generator().manual_seed(base.seeds[7]))
    assert torch.equal(redrawn[0], base.image_ids[7])
    assert base.seeds[7] == image_seed(7, "a green one", 1)
    assert len(set(base.seeds)) == 9 and all(0 <= s < 2**32 for s in base.seeds)


class OneGeneratorPerCall:
    """The transformer as seen through the minimal API (one generator per call, no ``row_generators``)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def parameters(self):
        return self.model.parameters()

    def generate_image_ids(self, text_ids, *, temperature=1.0, top_k=None, generator=None):
        return self.model.generate_image_ids(text_ids, temperature=temperature, top_k=top_k, generator=generator)


def test_per_image_seeds_give_the_same_images_with_or_without_row_generators(bundle: Bundle):
    options = SamplingOptions(seed=11, top_k=5, batch_size=4)
    batched = generate(bundle, ["a red one", "a blue one"], 3, options)
    minimal = Bundle(OneGeneratorPerCall(bundle.model), bundle.text_tokenizer, bundle.image_tokenizer)  # type: ignore[arg-type]
    one_by_one = generate(minimal, ["a red one", "a blue one"], 3, options)
    assert torch.equal(batched.image_ids, one_by_one.image_ids) and batched.seeds == one_by_one.seeds


def test_batch_seed_scope_is_reproducible_for_one_batch_size(bundle: Bundle):
    options = SamplingOptions(seed=5, batch_size=2, seed_scope="batch")
    first = generate(bundle, ["x", "y"], 3, options)
    assert torch.equal(first.image_ids, generate(bundle, ["x", "y"], 3, options).image_ids)
    # One generator over the chunks, as the transformer is called: the reference, written out.
    text = bundle.text_tokenizer.encode(["x"] * 3 + ["y"] * 3, bundle.model.config.text_seq_len)
    generator = torch.Generator().manual_seed(5)
    expected = torch.cat([bundle.model.generate_image_ids(text[i : i + 2], generator=generator) for i in (0, 2, 4)])
    assert torch.equal(first.image_ids, expected)
    assert first.seeds == (5,) * 6


def test_generate_accepts_a_checkpoint_directory(bundle_dir, bundle: Bundle):
    from_path = generate(bundle_dir, ["p"], 2, SamplingOptions(seed=1))
    assert torch.equal(from_path.image_ids, generate(bundle, ["p"], 2, SamplingOptions(seed=1)).image_ids)


def test_bad_requests(bundle: Bundle):
    with pytest.raises(DalleError, match="at least one prompt"):
        generate(bundle, [])
    with pytest.raises(DalleError, match="expected a list of prompts"):
        generate(bundle, "a red one")
    with pytest.raises(DalleError, match="temperature must be positive, got 0"):
        SamplingOptions(temperature=0)
    with pytest.raises(DalleError, match="seed_scope must be 'image' or 'batch', got 'row'"):
        SamplingOptions(seed_scope="row")  # type: ignore[arg-type]
    with pytest.raises(DalleError, match="seed must be >= 0"):
        SamplingOptions(seed=-1)
    with pytest.raises(DalleError, match="text .* is 60 tokens long, more than the context length 48"):
        generate(bundle, ["x" * 60])


def test_files_and_report(bundle: Bundle, tmp_path):
    generation = generate(bundle, ["one", "two"], n_per_prompt=2, options=SamplingOptions(seed=1, top_k=3))
    paths = write_generation(generation, tmp_path / "out", scale=2, metadata={"checkpoint": "somewhere"})
    sidecar = json.loads((tmp_path / "out" / "generations.json").read_text())
    records = sidecar["images"]
    assert [r["prompt"] for r in records] == ["one", "one", "two", "two"]
    assert [r["seed"] for r in records] == list(generation.seeds)
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["top_k"] == 3 and r["temperature"] == 1.0 and r["seed_scope"] == "image" for r in records)
    assert sidecar["options"]["seed"] == 1 and sidecar["metadata"] == {"checkpoint": "somewhere"}
    assert all(p.is_file() for p in paths)
    with Image.open(paths[0]) as picture:
        assert picture.size == (32, 32)
    with Image.open(tmp_path / "out" / "grid.png") as grid:  # one row per prompt: 2 x 2 tiles of 16 px, padding 2
        assert grid.size == ((2 * 18 + 2) * 2, (2 * 18 + 2) * 2)
    page = write_report(
        tmp_path / "out",
        "t <&>",
        [("one", paths[:2], "ok"), ("two", paths[2:], "")],
        {"a": {"b": 0.5}},
        grid=tmp_path / "out" / "grid.png",
        notes=["seed 1 & more"],
    )
    text = page.read_text()
    assert "t &lt;&amp;&gt;" in text and "<th>a.b</th><td>0.5</td>" in text and "<p>seed 1 &amp; more</p>" in text
    sources = re.findall(r'src="([^"]+)"', text)
    assert sources == ["images/0000.png", "images/0001.png", "images/0002.png", "images/0003.png", "grid.png"]
    assert all((tmp_path / "out" / s).is_file() for s in sources)


def test_report_links_survive_odd_file_names(tmp_path):
    (tmp_path / "my images").mkdir()
    path = tmp_path / "my images" / "a#1.png"
    Image.new("RGB", (4, 4)).save(path)
    text = write_report(tmp_path, "t", [("p", [path], "")], {}).read_text()
    assert 'src="my%20images/a%231.png"' in text
