"""Data sources: folder pairs, tar shards (local, URL, workers, ranks), token shards, and the resumable streams."""

from __future__ import annotations

import functools
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from conftest import read_metrics
from PIL import Image

from dalle_core.config import from_dict
from dalle_core.errors import ConfigError, DataError, ShapeError
from dalle_tokenizers import SimpleTokenizer
from dalle_train.datasets.build import first_items, open_sources
from dalle_train.datasets.folder import ImageTextFolder
from dalle_train.datasets.samples import SkipUnreadable
from dalle_train.datasets.shapes import ShapeSpec, render
from dalle_train.datasets.streams import MapBatchStream, RankBatches, StreamBatchStream
from dalle_train.datasets.tar_shards import TarShardStream, expand_braces, expand_shards, write_tar_shard
from dalle_train.datasets.token_shards import TokenShards, read_token_index, write_token_shards
from dalle_train.run import run_training
from dalle_train.run_config import DataConfig, RunConfig
from dalle_vae import DiscreteVAE, DiscreteVAEConfig

COLOURS = ("red", "green", "blue", "yellow", "cyan", "purple")


def png_bytes(colour: str, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    render(ShapeSpec(colour, "square", "large", "center"), max(size, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_folder(root, truncated: bool = True):
    root.mkdir()
    for index, colour in enumerate(COLOURS[:3]):
        (root / f"{colour}.png").write_bytes(png_bytes(colour))
        lines = [f"a {colour} square number {k}" for k in range(10)] if index == 0 else [f"a {colour} square"]
        (root / f"{colour}.txt").write_text("\n".join(lines) + "\n")
    (root / "uncaptioned.png").write_bytes(png_bytes("cyan"))
    if truncated:
        data = png_bytes("purple")
        (root / "broken.png").write_bytes(data[: len(data) // 2])
        (root / "broken.txt").write_text("a broken square\n")
    return root


# ------------------------------------------------------------------------------------------------------------ folder


def test_folder_pairs_captions_and_unreadable_images(tmp_path):
    folder = ImageTextFolder(make_folder(tmp_path / "images"), image_size=16, seed=3)
    assert [p[0].name for p in folder.pairs] == ["blue.png", "broken.png", "green.png", "red.png"]
    assert [p.name for p in folder.uncaptioned] == ["uncaptioned.png"]
    red = folder.pairs.index(next(p for p in folder.pairs if p[0].name == "red.png"))
    item = folder.read(red, 0)
    assert item["image"].shape == (3, 16, 16) and item["caption"].startswith("a red square number")
    # One caption per draw, the same for the same (seed, epoch, index), varying over epochs.
    assert folder.read(red, 5)["caption"] == folder.read(red, 5)["caption"]
    drawn = {folder.read(red, epoch)["caption"] for epoch in range(30)}
    assert 5 <= len(drawn) <= 10
    expected = np.random.default_rng((3, 7, red)).integers(10)
    assert folder.read(red, 7)["caption"] == f"a red square number {expected}"

    broken = next(i for i, p in enumerate(folder.pairs) if p[0].name == "broken.png")
    with pytest.raises(OSError):
        folder.read(broken, 0)
    sample = SkipUnreadable(folder)[(broken, 0)]
    assert sample.item["caption"] == "a green square"  # the next readable item stands in
    assert len(sample.skipped) == 1 and "broken.png" in sample.skipped[0] and "OSError" in sample.skipped[0]


def test_a_truncated_png_is_skipped_counted_and_reported_in_a_real_run(tmp_path, capsys):
    images = make_folder(tmp_path / "images")
    config = {
        "stages": ["vae"],
        "data": {"kind": "folder", "path": str(images)},
        "vae": {
            "vae": {"image_size": 16, "num_layers": 2, "num_tokens": 16, "codebook_dim": 8, "hidden_dim": 8},
            "loop": {"steps": 4, "batch_size": 4, "log_every": 4, "sample_every": 100, "checkpoint_every": 100},
        },
        "backend": {"kind": "single", "device": "cpu"},
        "logging": {"progress": False},
    }
    run_training(from_dict(RunConfig, config), tmp_path / "run")
    record = read_metrics(tmp_path / "run" / "vae" / "metrics.jsonl")[0]
    # 4 steps x 4 samples = 4 epochs over the 4 captioned images, so the broken one came up 4 times.
    assert record["step"] == 4 and record["skipped_samples"] == 4
    assert "skipped unreadable sample" in capsys.readouterr().err


def test_an_all_broken_folder_raises_instead_of_spinning(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for index in range(3):
        (root / f"{index}.png").write_bytes(b"not a png")
        (root / f"{index}.txt").write_text("x\n")
    with pytest.raises(DataError, match="3 unreadable samples in a row"):
        SkipUnreadable(ImageTextFolder(root, 16))[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="found no image with a same-stem .txt"):
        ImageTextFolder(tmp_path / "empty", 16)


# ------------------------------------------------------------------------------------------------------- tar shards


def test_brace_and_shard_expansion(tmp_path):
    assert expand_braces("s-{08..11}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar", "s-11.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("https://x/{0..1}.tar") == ["https://x/0.tar", "https://x/1.tar"]
    for name in ("a-0.tar", "a-1.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"")
    spec = f"{tmp_path}/a-{{0..1}}.tar::{tmp_path}/b*.tar::http://h/c.tar"
    assert expand_shards(spec) == [
        str(tmp_path / "a-0.tar"),
        str(tmp_path / "a-1.tar"),
        str(tmp_path / "b.tar"),
        "http://h/c.tar",
    ]
    with pytest.raises(DataError, match="shard not found"):
        expand_shards(f"{tmp_path}/a-{{0..2}}.tar")


def test_shards_are_split_over_ranks_and_workers_and_shuffled_per_epoch():
    shards = [f"s{i}" for i in range(7)]
    streams = [TarShardStream(shards, 16, rank, 2, seed=1) for rank in range(2)]
    for epoch in (0, 1):
        parts = []
        for stream in streams:
            stream.epoch = epoch
            parts += [stream.shards_for(worker, 2) for worker in range(2)]
        flat = [s for part in parts for s in part]
        assert sorted(flat) == sorted(shards) and len(flat) == len(set(flat))
    streams[0].epoch = 0
    first = streams[0].shards_for()
    streams[0].epoch = 1
    assert streams[0].shards_for() != first
    with pytest.raises(DataError, match="2 shards cannot be split over 3 processes"):
        TarShardStream(shards[:2], 16, 0, 3)


def write_noise_png(path, seed: int, size: int = 48) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8)  # not square
    Image.fromarray(pixels).save(path)


def test_random_crops_are_drawn_per_sample_and_epoch_and_validation_stays_centred(tmp_path):
    root = tmp_path / "noise"
    root.mkdir()
    for index in range(4):
        write_noise_png(root / f"{index}.png", index)
        (root / f"{index}.txt").write_text("\n".join(f"caption {index} {k}" for k in range(5)) + "\n")
    centred = ImageTextFolder(root, 16, seed=1)
    cropped = ImageTextFolder(root, 16, seed=1, min_crop_area=0.5)
    assert torch.equal(cropped.read(2, 3)["image"], cropped.read(2, 3)["image"]), "the same draw for (epoch, index)"
    assert cropped.read(2, 3)["caption"] == centred.read(2, 3)["caption"], "captions are drawn as without crops"
    by_epoch = [cropped.read(2, epoch)["image"] for epoch in range(8)]
    assert len({tuple(image.flatten()[:32].tolist()) for image in by_epoch}) >= 7, "a new crop every epoch"
    assert not any(torch.equal(image, centred.read(2, epoch)["image"]) for epoch, image in enumerate(by_epoch))
    assert torch.equal(cropped.centre_cropped().read(2, 5)["image"], centred.read(2, 5)["image"])

    # A held-out fraction of a randomly cropped folder is validated on centred crops.
    config = DataConfig(kind="folder", path=str(root), validation_fraction=0.5, random_crop_min_area=0.5, seed=1)
    sources = open_sources(config, 16)
    held = sources.validation.indices[0]
    assert torch.equal(sources.validation.read(0, 4)["image"], centred.read(held, 4)["image"])
    trained = sources.train.indices[0]
    assert torch.equal(sources.train.read(0, 4)["image"], cropped.read(trained, 4)["image"])

    # Sample-grid references of a folder without a validation split are centre crops too.
    alone = open_sources(DataConfig(kind="folder", path=str(root), random_crop_min_area=0.5, seed=1), 16)
    assert torch.equal(first_items(alone, 16, 4)[0]["image"], centred.read(0, 0)["image"])

    # WebDataset shards: the same crops for the same epoch (a resumed stream replays them), new ones next epoch.
    write_tar_shard(
        tmp_path / "noise.tar",
        [(str(index), (root / f"{index}.png").read_bytes(), "png", f"caption {index}") for index in range(4)],
    )
    stream = TarShardStream([str(tmp_path / "noise.tar")], 16, shuffle=False, min_crop_area=0.5)
    first, again = [s.item["image"] for s in stream], [s.item["image"] for s in stream]
    stream.epoch = 1
    later = [s.item["image"] for s in stream]
    plain = [s.item["image"] for s in TarShardStream([str(tmp_path / "noise.tar")], 16, shuffle=False)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, later, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, plain, strict=True))


def test_random_crop_config_is_checked():
    with pytest.raises(ConfigError, match=r"random_crop_min_area must be in \(0, 1\], got 0"):
        DataConfig(kind="folder", path="x", random_crop_min_area=0)
    with pytest.raises(ConfigError, match="applies to folder and webdataset images; data.kind=shapes"):
        DataConfig(kind="shapes", random_crop_min_area=0.75)


def write_shards(root, count: int = 3, per_shard: int = 4):
    """``count`` shards of ``per_shard`` samples; sample 1 of shard 0 has a corrupt PNG."""
    root.mkdir(exist_ok=True)
    keys = []
    for shard in range(count):
        samples = []
        for index in range(per_shard):
            key = f"{shard:02d}/{index:03d}"
            data = png_bytes(COLOURS[index % len(COLOURS)])
            if (shard, index) == (0, 1):
                data = data[:40]
            else:
                keys.append(key)
            samples.append((key, data, "png", f"caption {key}\nother {key}"))
        write_tar_shard(root / f"shard-{shard}.tar", samples)
    return keys


def captions_of(samples) -> list[str]:
    return [sample.item["caption"].split()[1] for sample in samples]


def test_tar_shards_read_skip_corrupt_samples_and_truncated_shards(tmp_path):
    keys = write_shards(tmp_path / "shards")
    data = (tmp_path / "shards" / "shard-2.tar").read_bytes()
    (tmp_path / "shards" / "shard-2.tar").write_bytes(data[: len(data) // 2])  # a shard cut off mid-way
    shards = expand_shards(f"{tmp_path}/shards/shard-{{0..2}}.tar")
    samples = list(TarShardStream(shards, 16, shuffle=False))
    seen = captions_of(samples)
    assert seen[:7] == keys[:7]  # shards 0 and 1 whole, minus the corrupt sample
    assert 7 < len(seen) < len(keys) and seen == keys[: len(seen)]
    reasons = [reason for sample in samples for reason in sample.skipped]
    assert any("shard-0.tar:00/001" in reason for reason in reasons)
    assert samples[0].item["image"].shape == (3, 16, 16)
    # Ranks read disjoint shards that together are all of them.
    by_rank = [captions_of(TarShardStream(shards[:2], 16, rank, 2, shuffle=False)) for rank in range(2)]
    assert sorted(by_rank[0] + by_rank[1]) == sorted(keys[:7]) and not set(by_rank[0]) & set(by_rank[1])


def test_tar_shards_over_http(tmp_path):
    keys = write_shards(tmp_path / "shards", count=2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "shards"))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{0..1}}.tar"
        assert captions_of(TarShardStream(expand_shards(url), 16, shuffle=False)) == keys
    finally:
        server.shutdown()


def test_stream_batches_with_workers_resume_at_their_position(tmp_path):
    write_shards(tmp_path / "shards", count=4, per_shard=6)
    shards = expand_shards(f"{tmp_path}/shards/shard-*.tar")

    def stream(workers: int) -> StreamBatchStream:
        return StreamBatchStream(
            TarShardStream(shards, 16, seed=5, shuffle_buffer=4), micro_batch=3, num_workers=workers
        )

    first = stream(2)
    epoch_one = [next(first)["captions"] for _ in range(7)]  # 23 readable samples: 7 full batches of 3
    seen = [c.split()[1] for batch in epoch_one for c in batch]
    assert len(seen) == len(set(seen)) == 21
    state = first.state_dict()
    assert state == {"kind": "stream", "epoch": 0, "batches": 7}
    following = [next(first)["captions"] for _ in range(3)]
    assert first.epoch == 1

    again = stream(2)
    again.load_state_dict([state])
    assert [next(again)["captions"] for _ in range(3)] == following


# ----------------------------------------------------------------------------------------------- map-style streams


def test_two_ranks_together_see_what_one_process_sees_and_epochs_cover_everything():
    one = iter(RankBatches(size=5, micro_batch=4, rank=0, world_size=1, seed=2))
    halves = [iter(RankBatches(5, 2, rank, 2, seed=2)) for rank in range(2)]
    for _ in range(6):
        assert next(one) == next(halves[0]) + next(halves[1])
    keys = [key for _, key in zip(range(5), RankBatches(5, 1, 0, 1, seed=2), strict=False)]
    assert sorted(index for [(index, epoch)] in keys) == [0, 1, 2, 3, 4] and {e for [(_, e)] in keys} == {0}
    resumed = iter(RankBatches(5, 4, 0, 1, seed=2, start=8))
    fresh = iter(RankBatches(5, 4, 0, 1, seed=2))
    next(fresh), next(fresh)
    assert next(resumed) == next(fresh)


def test_map_stream_state_round_trip():
    from conftest import TinyImages

    stream = MapBatchStream(SkipUnreadable(TinyImages(10)), micro_batch=3, rank=0, world_size=1, seed=0)
    for _ in range(4):
        next(stream)
    state = stream.state_dict()
    expected = next(stream)["images"]
    other = MapBatchStream(SkipUnreadable(TinyImages(10)), micro_batch=3, rank=0, world_size=1, seed=0)
    other.load_state_dict([state])
    assert state == {"kind": "map", "position": 12} and torch.equal(next(other)["images"], expected)
    # DataLoader workers read the same keys: the batches do not depend on the number of workers.
    workers = MapBatchStream(SkipUnreadable(TinyImages(10)), 3, 0, 1, seed=0, num_workers=2)
    workers.load_state_dict([state])
    assert torch.equal(next(workers)["images"], expected)


# ------------------------------------------------------------------------------------------------------ token shards


def test_token_shards_round_trip_and_validate(tmp_path):
    tokenizer = SimpleTokenizer()
    vae = DiscreteVAE(DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=8, hidden_dim=8))
    generator = torch.Generator().manual_seed(0)
    captions = [f"caption {i}" for i in range(30)]
    text = tokenizer.encode(captions, 12)
    image = torch.randint(0, 16, (30, 16), generator=generator)
    batches = [(text[i : i + 7], image[i : i + 7], captions[i : i + 7]) for i in range(0, 30, 7)]
    index = write_token_shards(tmp_path / "tokens", batches, tokenizer, vae, shard_size=12, image_tokenizer_source="v")
    assert [shard["count"] for shard in index["shards"]] == [12, 12, 6]
    assert read_token_index(tmp_path / "tokens") == index
    assert (index["text_seq_len"], index["image_seq_len"], index["num_text_tokens"], index["num_image_tokens"]) == (
        12,
        16,
        257,
        16,
    )
    shards = TokenShards(tmp_path / "tokens")
    assert len(shards) == 30
    for i in (0, 11, 12, 29):
        item = shards[i]
        assert torch.equal(item["text_ids"], text[i]) and torch.equal(item["image_ids"], image[i])
        assert item["caption"] == captions[i] and item["image_ids"].dtype == torch.int64
    with pytest.raises(ShapeError, match=r"image_ids: ids must be in \[0, 16\)"):
        write_token_shards(tmp_path / "bad", [(text, image + 16, captions)], tokenizer, vae)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DataError, match="not a token-shard directory"):
        TokenShards(tmp_path)


def test_webdataset_run_trains_both_stages(tmp_path):
    write_shards(tmp_path / "shards", count=2, per_shard=6)
    config = {
        "stages": ["vae", "dalle"],
        "data": {
            "kind": "webdataset",
            "path": f"{tmp_path}/shards/shard-{{0..1}}.tar",
            "shuffle_buffer": 4,
            "random_crop_min_area": 0.75,
        },
        "vae": {
            "vae": {"image_size": 16, "num_layers": 2, "num_tokens": 16, "codebook_dim": 8, "hidden_dim": 8},
            "loop": {"steps": 3, "batch_size": 4, "log_every": 1, "sample_every": 3, "checkpoint_every": 3},
        },
        "dalle": {
            "model": {"dim": 16, "depth": 1, "heads": 2, "dim_head": 8},
            "text_seq_len": 24,
            "loop": {"steps": 3, "batch_size": 4, "log_every": 1, "sample_every": 3, "checkpoint_every": 3},
        },
        "backend": {"kind": "single", "device": "cpu"},
        "logging": {"progress": False},
    }
    result = run_training(from_dict(RunConfig, config), tmp_path / "run")
    assert (result.bundle_dir / "model.safetensors").is_file()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "dalle" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert (tmp_path / "run" / "dalle" / "samples" / "dalle-step-000003.png").is_file()
