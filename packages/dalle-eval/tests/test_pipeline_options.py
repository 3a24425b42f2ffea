"""The pipeline's top-p, guidance, priming and progress options, checked against direct calls of the transformer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_core.errors import ConfigError, DalleError, DataError
from dalle_eval.pipeline import (
    PREVIEW_GREY,
    Priming,
    ProgressPreviews,
    SamplingOptions,
    decode_images,
    decode_partial,
    encode_priming_image,
    generate,
    image_seed,
    load_priming_image,
    write_generation,
)
from dalle_train.bundle import Bundle

PROMPTS = ["a red one", "a blue one"]


def reference_ids(bundle: Bundle, prompts, n, seed, **kwargs) -> torch.Tensor:
    """One direct ``generate_image_ids`` call per image, seeded as the pipeline documents (seed_scope='image')."""
    rows = []
    for prompt in prompts:
        for sample in range(n):
            text = bundle.text_tokenizer.encode([prompt], bundle.model.config.text_seq_len)
            generator = torch.Generator().manual_seed(image_seed(seed, prompt, sample))
            rows.append(bundle.model.generate_image_ids(text, generator=generator, **kwargs))
    return torch.cat(rows)


def test_cond_scale_one_is_no_guidance_and_other_scales_reach_the_model(bundle: Bundle):
    plain = generate(bundle, PROMPTS, 3, SamplingOptions(seed=3, batch_size=4))
    scale_one = generate(bundle, PROMPTS, 3, SamplingOptions(seed=3, batch_size=4, cond_scale=1.0))
    assert torch.equal(plain.image_ids, scale_one.image_ids)
    guided = generate(bundle, PROMPTS, 3, SamplingOptions(seed=3, batch_size=4, cond_scale=4.0, top_p=0.9))
    expected = reference_ids(bundle, PROMPTS, 3, 3, cond_scale=4.0, top_p=0.9)
    assert torch.equal(guided.image_ids, expected)
    assert not torch.equal(guided.image_ids, plain.image_ids)


def test_top_p_reaches_the_model_and_a_tiny_nucleus_is_greedy(bundle: Bundle):
    nucleus = generate(bundle, PROMPTS, 2, SamplingOptions(seed=5, top_p=0.5))
    assert torch.equal(nucleus.image_ids, reference_ids(bundle, PROMPTS, 2, 5, top_p=0.5))
    # A nucleus smaller than any probability keeps only the most likely code: every seed gives the same image.
    greedy = [generate(bundle, ["x"], 1, SamplingOptions(seed=s, top_p=1e-6)).image_ids for s in (1, 2)]
    assert torch.equal(greedy[0], greedy[1])


def test_per_image_seeds_do_not_depend_on_batching_with_guidance_and_priming(bundle: Bundle):
    priming = Priming(torch.arange(16) % 16, 5, "codes")
    options = dict(seed=9, cond_scale=2.5, top_p=0.95)
    big = generate(bundle, PROMPTS, 3, SamplingOptions(batch_size=8, **options), priming=priming)
    small = generate(bundle, PROMPTS, 3, SamplingOptions(batch_size=1, **options), priming=priming)
    assert torch.equal(big.image_ids, small.image_ids)
    alone = generate(bundle, PROMPTS[1:], 2, SamplingOptions(batch_size=8, **options), priming=priming)
    assert torch.equal(alone.image_ids, big.image_ids[3:5])


def test_priming_keeps_the_first_codes_of_the_image(bundle: Bundle):
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    codes = bundle.image_tokenizer.encode(image[None])[0]
    priming = encode_priming_image(bundle, image, num_tokens=6, source="mem")
    assert torch.equal(priming.image_ids, codes) and priming.num_tokens == 6
    drawn = generate(bundle, PROMPTS, 3, SamplingOptions(seed=1), priming=priming)
    assert torch.equal(drawn.image_ids[:, :6], codes[:6].expand(6, -1))
    expected = reference_ids(bundle, PROMPTS, 3, 1, init_image_ids=codes[None, :6], num_init_img_tokens=6)
    assert torch.equal(drawn.image_ids, expected)
    # The default keeps DALLE-pytorch's share, int(0.4375 * 16) = 7 codes; zero codes is no priming at all.
    assert encode_priming_image(bundle, image).num_tokens == 7
    unprimed = generate(bundle, PROMPTS, 3, SamplingOptions(seed=1))
    zero = generate(bundle, PROMPTS, 3, SamplingOptions(seed=1), priming=Priming(codes, 0))
    assert torch.equal(zero.image_ids, unprimed.image_ids)
    with pytest.raises(ConfigError, match="fewer than the 16 codes"):
        generate(bundle, PROMPTS, 1, priming=Priming(codes, 16))
    with pytest.raises(ConfigError, match="expected 0 to 16"):
        Priming(codes, 17)


def test_priming_image_files(bundle: Bundle, tmp_path):
    picture = (np.random.default_rng(0).random((20, 24, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "prime.png")
    priming = load_priming_image(bundle, tmp_path / "prime.png", 4)
    # Centre crop 20x20 of the 24-wide picture, resized to 16 px (bicubic), as the data pipeline does.
    expected_pixels = Image.fromarray(picture).crop((2, 0, 22, 20)).resize((16, 16), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(expected_pixels, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(priming.image_ids, bundle.image_tokenizer.encode(expected[None])[0])
    assert priming.source == str(tmp_path / "prime.png")
    with pytest.raises(DataError, match="priming image not found"):
        load_priming_image(bundle, tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read priming image"):
        load_priming_image(bundle, tmp_path / "broken.png")


def test_progress_reports_prefixes_of_the_final_codes(bundle: Bundle):
    reports = []
    priming = Priming(torch.arange(16), 3)
    drawn = generate(
        bundle,
        PROMPTS,
        2,
        SamplingOptions(seed=2, batch_size=3),
        priming=priming,
        progress=lambda step, indices, ids: reports.append((step, indices, ids)),
        progress_every=5,
    )
    # Batches of 3 then 1 rows; 13 codes are sampled after the 3 primed ones: reports after 5, 10 and 13 of them.
    assert [(step, indices) for step, indices, _ in reports] == [
        (8, (0, 1, 2)),
        (13, (0, 1, 2)),
        (16, (0, 1, 2)),
        (8, (3,)),
        (13, (3,)),
        (16, (3,)),
    ]
    for step, indices, ids in reports:
        assert torch.equal(ids, drawn.image_ids[list(indices), :step])
    with pytest.raises(ConfigError, match="progress_every"):
        generate(bundle, PROMPTS, 1, progress=lambda *a: None, progress_every=0)


def test_partial_previews_grey_out_the_unknown_patches(bundle: Bundle, tmp_path):
    drawn = generate(bundle, ["x"], 2, SamplingOptions(seed=0))
    assert torch.equal(decode_partial(bundle, drawn.image_ids), decode_images(bundle, drawn.image_ids))
    partial = decode_partial(bundle, drawn.image_ids[:, :6])  # 4x4 grid of 4x4-pixel patches: 1.5 rows known
    padded = torch.cat([drawn.image_ids[:, :6], torch.zeros(2, 10, dtype=torch.long)], dim=1)
    decoded = decode_images(bundle, padded)
    assert torch.equal(partial[:, :, :4], decoded[:, :, :4])  # the first row of patches is the decoder's output
    assert torch.equal(partial[:, :, 4:8, :8], decoded[:, :, 4:8, :8])  # two patches of the second row too
    assert bool((partial[:, :, 4:8, 8:] == PREVIEW_GREY).all()) and bool((partial[:, :, 8:] == PREVIEW_GREY).all())

    previews = ProgressPreviews(bundle, tmp_path / "progress")
    previews(6, (4, 5), drawn.image_ids[:, :6])
    assert [p.name for p in previews.paths] == ["0004-step-0006.png", "0005-step-0006.png"]
    pixels = np.asarray(Image.open(tmp_path / "progress" / "0005-step-0006.png"))
    assert (pixels[8:] == 128).all() and pixels.shape == (16, 16, 3)


def test_new_options_are_recorded_and_validated(bundle: Bundle, tmp_path):
    priming = Priming(torch.arange(16) % 16, 2, "file.png")
    options = SamplingOptions(seed=1, top_p=0.7, cond_scale=2.0)
    drawn = generate(bundle, ["one"], 2, options, priming=priming)
    write_generation(drawn, tmp_path)
    sidecar = json.loads((tmp_path / "generations.json").read_text())
    saved_ids = np.load(tmp_path / sidecar["image_ids_file"])
    assert saved_ids.dtype == np.int32 and np.array_equal(saved_ids, drawn.image_ids.numpy())
    assert sidecar["options"]["top_p"] == 0.7 and sidecar["options"]["cond_scale"] == 2.0
    assert sidecar["priming"] == {"num_tokens": 2, "source": "file.png", "image_ids": [0, 1]}
    assert {(r["top_p"], r["cond_scale"], r["priming_tokens"]) for r in sidecar["images"]} == {(0.7, 2.0, 2)}
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(cond_scale=-1.0), dict(cond_scale=float("nan"))):
        with pytest.raises(DalleError):
            SamplingOptions(**bad)
