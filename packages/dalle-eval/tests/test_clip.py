"""CLIP training, loading, scoring and reranking (needs the ``clip`` extra: open-clip-torch)."""

from __future__ import annotations

import json

import pytest
import torch

from dalle_core.errors import CheckpointError, ConfigError
from dalle_core.images import from_pil
from dalle_eval.clip import CONFIG_FILE, WEIGHTS_FILE, clip_score, load_clip
from dalle_eval.clip_train import ClipTrainConfig, train_clip
from dalle_eval.image_folder import shapes_pairs
from dalle_eval.pipeline import Generation, SamplingOptions
from dalle_eval.rerank import rerank
from dalle_eval.weights import MissingWeightsError
from dalle_train.datasets.shapes import COLOURS, ShapeSpec, render, split_specs

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIP trained for 60 steps on the shapes training split (about 10 s on one CPU thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = shapes_pairs(32, "train", samples_per_spec=4)
    directory = train_clip(ClipTrainConfig(steps=60, batch_size=32), data, tmp_path_factory.mktemp("clip") / "clip")
    torch.set_num_threads(threads)
    return directory


def colour_variants(spec: ShapeSpec) -> torch.Tensor:
    return torch.stack([from_pil(render(ShapeSpec(c, spec.shape, spec.size, spec.position), 32)) for c in COLOURS])


def test_the_saved_model_is_an_open_clip_local_dir(clip_dir):
    config = json.loads((clip_dir / CONFIG_FILE).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32 and (clip_dir / WEIGHTS_FILE).is_file()
    summary = json.loads((clip_dir / "training_summary.json").read_text())
    assert summary["final_loss"] < summary["first_loss"] - 1.0  # it learned something
    model = open_clip.create_model(f"local-dir:{clip_dir}")  # no code of ours needed to load it
    assert model.visual.image_size == (32, 32)


def test_reranking_picks_the_colour_the_caption_asks_for(clip_dir):
    scorer = load_clip(clip_dir)
    _, heldout = split_specs(0, 0.15)  # compositions the CLIP never saw in training
    images = torch.cat([colour_variants(spec) for spec in heldout])
    prompts = tuple(spec.caption for spec in heldout for _ in COLOURS)
    candidates = Generation(
        prompts=prompts,
        images=images,
        image_ids=torch.zeros(len(prompts), 1, dtype=torch.long),
        options=SamplingOptions(),
        prompt_indices=tuple(p for p in range(len(heldout)) for _ in COLOURS),
        sample_indices=tuple(s for _ in heldout for s in range(len(COLOURS))),
    )
    best = rerank(candidates, scorer.cosine, keep=1)
    picked = [COLOURS[candidates.sample_indices[i]] for i in best.kept_indices]
    accuracy = sum(colour == spec.colour for colour, spec in zip(picked, heldout, strict=True)) / len(heldout)
    assert len(heldout) == 27
    assert accuracy >= 0.6  # chance is 1/6; 60 training steps reach about 1.0 here
    assert best.kept.prompts == tuple(spec.caption for spec in heldout)


def test_scores_are_the_cosine_of_open_clip_embeddings(clip_dir):
    scorer = load_clip(clip_dir)
    spec = ShapeSpec("red", "circle", "large", "center")
    images = colour_variants(spec)[:3]
    texts = [spec.caption, "a small blue square at the top left", "a large green triangle in the center"]
    # Independently: open_clip's own model, transform and tokenizer on the 8-bit pictures.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    from dalle_core.images import to_pil

    with torch.no_grad():
        image_features = model.eval().encode_image(torch.stack([preprocess(to_pil(i)) for i in images]))
        text_features = model.encode_text(tokenizer(texts))
    expected = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    assert torch.allclose(scorer.cosine(images, texts), expected, atol=1e-5)
    assert torch.allclose(clip_score(scorer, images, texts), 100 * expected.clamp_min(0), atol=1e-3)


def test_an_architecture_name_with_a_local_weights_file(clip_dir, tmp_path):
    # Register the tiny config as an open_clip architecture, then load it the way a downloaded ViT-B-32 file would be.
    config = json.loads((clip_dir / CONFIG_FILE).read_text())
    (tmp_path / "dalle-eval-tiny-test.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(tmp_path / "dalle-eval-tiny-test.json")
    by_name = load_clip("dalle-eval-tiny-test", clip_dir / WEIGHTS_FILE)
    by_dir = load_clip(clip_dir)
    images, texts = torch.rand(2, 3, 32, 32), ["a red thing", "a large blue circle in the center"]
    assert torch.allclose(by_name.embed_texts(texts), by_dir.embed_texts(texts), atol=1e-6)
    # The architecture's default preprocessing (224 px) differs from the trained one, so compare text only plus shape.
    assert by_name.embed_images(images).shape == (2, 64)


def test_loading_errors(clip_dir, tmp_path):
    with pytest.raises(MissingWeightsError, match="CLIP ViT-B-32: no weights file given; .*--clip-weights"):
        load_clip("ViT-B-32")
    with pytest.raises(MissingWeightsError, match=f"weights file not found at {tmp_path / 'vit.bin'}"):
        load_clip("ViT-B-32", tmp_path / "vit.bin")
    with pytest.raises(ConfigError, match="'no-such-arch' is neither a directory"):
        load_clip("no-such-arch")
    with pytest.raises(CheckpointError, match="is not a CLIP model directory"):
        load_clip(tmp_path)
    with pytest.raises(ConfigError, match="holds its own weights"):
        load_clip(clip_dir, clip_dir / WEIGHTS_FILE)


def test_train_config_is_validated():
    with pytest.raises(ConfigError, match="image_size \\(30\\) must be a multiple of patch_size \\(8\\)"):
        ClipTrainConfig(image_size=30)
    with pytest.raises(ConfigError, match="width \\(64\\) must be a multiple of heads \\(3\\)"):
        ClipTrainConfig(heads=3)


def test_eval_reranks_and_reports_the_clip_score(clip_dir, make_bundle_dir, tmp_path):
    from dalle_eval.evaluate import EvalConfig, run_eval
    from dalle_eval.pipeline import generate

    checkpoint = make_bundle_dir(tmp_path / "model", image_size=32, num_layers=3)
    sampling = SamplingOptions(seed=4)
    config = EvalConfig(
        checkpoint=checkpoint,
        max_prompts=2,
        images_per_prompt=2,
        candidates_per_prompt=5,
        sampling=sampling,
        clip_model=str(clip_dir),
        reference="none",
        prompts=("a large red circle at the top left", "a small blue square in the center"),
    )
    metrics = run_eval(config, tmp_path / "report")
    scorer = load_clip(clip_dir)
    drawn = generate(checkpoint, list(config.prompts), 5, sampling)
    scores = clip_score(scorer, drawn.images, drawn.prompts)
    best = [i for p in (0, 1) for i in sorted(range(5 * p, 5 * p + 5), key=lambda i: -float(scores[i]))[:2]]
    assert metrics["clip"]["clip_score"] == pytest.approx(float(scores[best].mean()), rel=1e-4)
    assert metrics["clip"]["clip_score_all_candidates"] == pytest.approx(float(scores.mean()), rel=1e-4)
    sidecar = json.loads((tmp_path / "report" / "generations.json").read_text())
    assert [r["sample_index"] for r in sidecar["images"]] == [drawn.sample_indices[i] for i in best]
    cosines = scorer.cosine(drawn.images, drawn.prompts)
    assert [r["score"] for r in sidecar["images"]] == pytest.approx([float(cosines[i]) for i in best], abs=1e-5)
