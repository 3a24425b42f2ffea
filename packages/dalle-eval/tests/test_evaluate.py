from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from dalle_core.errors import ConfigError, DataError
from dalle_eval.evaluate import EvalConfig, Models, run_eval
from dalle_eval.fid import extract_features, frechet_distance_from_features, polynomial_mmd
from dalle_eval.image_folder import shapes_pairs
from dalle_eval.metrics import language_model_metrics, reconstruction_metrics
from dalle_eval.perceptual import Lpips
from dalle_eval.pipeline import SamplingOptions, generate
from dalle_train.bundle import load_bundle
from dalle_train.datasets.shapes import parse_caption, score, split_specs
from dalle_train.tokenized import TokenData


@pytest.fixture
def bundle_32(tmp_path, make_bundle_dir):
    return make_bundle_dir(tmp_path / "b32", image_size=32, num_layers=3)


def test_eval_writes_a_report_whose_numbers_match_direct_computations(bundle_32, tmp_path, tiny_features):
    torch.manual_seed(0)
    features, lpips = tiny_features(), Lpips()  # random weights: no downloads
    sampling = SamplingOptions(top_k=4, seed=3, batch_size=8)
    config = EvalConfig(
        checkpoint=bundle_32, max_prompts=3, images_per_prompt=2, sampling=sampling, reference_samples_per_spec=1
    )
    metrics = run_eval(config, tmp_path / "report", Models(features=features, lpips=lpips))

    on_disk = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    # Independently: the same prompts, images, reference set and metrics, computed step by step.
    bundle = load_bundle(bundle_32)
    prompts = [spec.caption for spec in split_specs(0, 0.15)[1][:3]]
    drawn = generate(bundle, prompts, 2, sampling)
    reference = shapes_pairs(32, "heldout", samples_per_spec=1)
    assert metrics["counts"] == {"prompts": 3, "candidates_per_prompt": 2, "kept_per_prompt": 2}
    assert metrics["shapes_checker"]["generated"] == score(drawn.images, [parse_caption(p) for p in drawn.prompts])
    assert metrics["shapes_checker"]["chance"]["colour"] == pytest.approx(1 / 6)
    vae = reconstruction_metrics(bundle.image_tokenizer, reference.images, lpips=lpips)
    assert metrics["vae"] == pytest.approx(vae)
    assert {"mse", "psnr", "ssim", "lpips", "codes_used", "perplexity"} <= set(metrics["vae"])
    text_ids = bundle.text_tokenizer.encode(list(reference.captions), 48)
    held_out = TokenData(text_ids, bundle.image_tokenizer.encode(reference.images), reference.captions)
    assert metrics["dalle_heldout"] == pytest.approx(language_model_metrics(bundle.model, held_out))
    real, fake = extract_features(features, reference.images), extract_features(features, drawn.images)
    assert metrics["fid_kid"]["fid"] == pytest.approx(frechet_distance_from_features(real, fake), rel=1e-6)
    assert metrics["fid_kid"]["kid"] == pytest.approx(polynomial_mmd(real, fake), rel=1e-6)

    page = (tmp_path / "report" / "index.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 7 and all((tmp_path / "report" / s).is_file() for s in sources)
    for prompt in prompts:
        assert prompt in page
    assert "fid_kid.fid" in page and "shapes_checker.generated.colour" in page
    with Image.open(tmp_path / "report" / sources[0]) as picture:
        assert picture.size == (128, 128)  # image_scale 4


def test_eval_with_a_captioned_folder_as_reference(bundle_32, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (40, 40), colour).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"photo {index}\n\nanother caption {index}\n")
    Image.new("RGB", (40, 40)).save(folder / "uncaptioned.png")
    config = EvalConfig(checkpoint=bundle_32, reference=str(folder), images_per_prompt=1, max_prompts=4)
    metrics = run_eval(config, tmp_path / "report")
    assert metrics["counts"]["prompts"] == 4  # the folder's distinct captions, in file order, cut to max_prompts
    assert "shapes_checker" not in metrics and "fid_kid" not in metrics and "clip" not in metrics
    assert metrics["vae"]["psnr"] > 0 and metrics["dalle_heldout"]["image_loss"] > 0
    sidecar = json.loads((tmp_path / "report" / "generations.json").read_text())
    assert [r["prompt"] for r in sidecar["images"]] == ["photo 0", "another caption 0", "photo 1", "another caption 1"]


def test_eval_refuses_what_it_cannot_do(bundle_32, tmp_path):
    with pytest.raises(ConfigError, match="keeping 2 of 4 candidates needs a CLIP model"):
        EvalConfig(checkpoint=bundle_32, images_per_prompt=2, candidates_per_prompt=4)
    with pytest.raises(ConfigError, match="candidates_per_prompt \\(1\\) must be >= images_per_prompt \\(2\\)"):
        EvalConfig(checkpoint=bundle_32, images_per_prompt=2, candidates_per_prompt=1)
    with pytest.raises(DataError, match="expected prompts"):
        run_eval(EvalConfig(checkpoint=bundle_32, reference="none"), tmp_path / "r")
    from dalle_eval.weights import MissingWeightsError

    config = EvalConfig(checkpoint=bundle_32, prompts=("x",), images_per_prompt=1, inception_weights=tmp_path / "i.pth")
    with pytest.raises(MissingWeightsError, match="FID Inception: weights file not found at .*i.pth"):
        run_eval(config, tmp_path / "r")
