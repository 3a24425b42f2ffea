"""The run config tree: files, recipes, overrides, and the checks that run before any work."""

from __future__ import annotations

import pytest
from conftest import tiny_dalle_run

from dalle_core.config import from_dict
from dalle_core.errors import ConfigError
from dalle_train.backends import SingleBackend
from dalle_train.config import LoopConfig
from dalle_train.recipes import list_recipes, recipe_path
from dalle_train.run import prepare
from dalle_train.run_config import RunConfig, load_run_config
from dalle_train.validation import batch_problems


def test_recipes_ship_with_the_package_and_load_by_name():
    assert list_recipes() == ["coco", "cub200", "tiny-cpu"]
    for name in list_recipes():
        config = load_run_config(name)
        assert config.stages == ("vae", "dalle") and recipe_path(name).is_file()
    coco = load_run_config("coco", ["data.path=/data/{0..9}.tar", "dalle.loop.steps=5", "backend.kind=fsdp"])
    assert coco.data.kind == "webdataset" and coco.data.path == "/data/{0..9}.tar"
    assert coco.dalle.loop.steps == 5 and coco.dalle.loop.precision == "bf16" and coco.backend.kind == "fsdp"
    with pytest.raises(ConfigError, match=r"'nope' is neither a config file nor a recipe; recipes: coco, cub200, tiny"):
        load_run_config("nope")


def test_yaml_file_overrides_and_field_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stages: [dalle]\ndalle:\n  text_seq_len: 32\n  model: {dim: 64}\n")
    config = load_run_config(path, ["dalle.model.depth=3", "dalle.sample_prompts=[a cat, a dog]", "data.kind=folder"])
    assert config.stages == ("dalle",) and config.dalle.model == {"dim": 64, "depth": 3}
    assert config.dalle.sample_prompts == ("a cat", "a dog") and config.data.kind == "folder"
    with pytest.raises(ConfigError, match=r"^unknown config field dalle.loop.stepz"):
        load_run_config(path, ["dalle.loop.stepz=3"])
    with pytest.raises(ConfigError, match=r"^dalle.loop.precision: expected one of \['fp32', 'bf16', 'fp16'\]"):
        load_run_config(path, ["dalle.loop.precision=fp8"])
    with pytest.raises(
        ConfigError, match=r"^model.attn_types\[1\]: expected one of \[.full., .axial_row.*got .diagonal.$"
    ):
        load_run_config(path, ["dalle.model.attn_types=[full, diagonal]"])
    with pytest.raises(ConfigError, match=r"^stages: expected \[vae\], \[dalle\] or \[vae, dalle\]"):
        load_run_config(path, ["stages=[dalle, vae]"])
    with pytest.raises(ConfigError, match=r"loop.batch_size=10 must be divisible by loop.grad_accum_steps=3"):
        load_run_config(path, ["dalle.loop.batch_size=10", "dalle.loop.grad_accum_steps=3"])


def test_every_cross_field_mistake_is_one_line_naming_its_field(tmp_path, token_assets):
    config = tiny_dalle_run(token_assets)
    config["dalle"]["text_seq_len"] = 12  # the shards hold 16 text ids per sample
    config["dalle"]["sample_prompts"] = ["a very long prompt that does not fit"]
    config["dalle"]["sample_top_k"] = 99  # the image vocabulary has 16 codes
    config["dalle"]["loop"]["precision"] = "fp16"
    config["data"]["image_size"] = 32  # the VAE takes 16 px
    with pytest.raises(ConfigError) as caught:
        prepare(from_dict(RunConfig, config), tmp_path, SingleBackend("cpu"))
    lines = str(caught.value).splitlines()
    starts = sorted(line.split(" ")[0].split(":")[0].split("=")[0] for line in lines)
    assert starts == sorted(
        [
            "data.image_size",
            "dalle.sample_prompts[0]",
            "dalle.text_seq_len",
            "dalle.sample_top_k",
            "dalle.loop.precision",
        ]
    ), lines
    assert any("does not match the image tokenizer's image_size=16" in line for line in lines)
    assert any("token shards in data.path hold 16 text ids" in line for line in lines)


def test_data_tokenizer_and_stage_mistakes(tmp_path, token_assets):
    config = tiny_dalle_run(token_assets)
    config["stages"] = ["vae", "dalle"]
    config["tokenizer"] = {"kind": "no-such-tokenizer"}
    with pytest.raises(ConfigError) as caught:
        prepare(from_dict(RunConfig, config), tmp_path, SingleBackend("cpu"))
    message = str(caught.value)
    assert "image_tokenizer is set but stages include vae" in message
    assert "tokenizer: no dalle.text_tokenizers entry named 'no-such-tokenizer'" in message
    assert "data.kind=token_shards holds no images; the vae stage needs images" in message

    config = tiny_dalle_run(token_assets)
    config["data"] = {"kind": "folder", "path": str(tmp_path / "missing")}
    del config["image_tokenizer"]
    with pytest.raises(ConfigError) as caught:
        prepare(from_dict(RunConfig, config), tmp_path, SingleBackend("cpu"))
    assert str(caught.value).startswith("image_tokenizer: the dalle stage needs an image tokenizer")

    config = tiny_dalle_run(token_assets)
    config["data"] = {"kind": "folder", "path": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match=r"^data.path: image folder not found: .*missing$"):
        prepare(from_dict(RunConfig, config), tmp_path, SingleBackend("cpu"))


def test_batch_must_split_over_processes_and_micro_batches():
    assert batch_problems("dalle", LoopConfig(batch_size=8, grad_accum_steps=2), 2) == []
    assert batch_problems("vae", LoopConfig(batch_size=12, grad_accum_steps=2), 4) == [
        "vae.loop.batch_size=12 is not divisible by world_size 4 x vae.loop.grad_accum_steps 2 = 8"
    ]
