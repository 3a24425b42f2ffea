"""Invalid configs and inputs fail early with one-line dalle_core errors that name the limit."""

from __future__ import annotations

import pytest
import torch

from dalle_core import ConfigError, ShapeError, VocabularyError
from dalle_core.config import from_dict, to_dict
from dalle_transformer import DALLE, DALLEConfig

CONFIG = DALLEConfig(
    num_text_tokens=23, text_seq_len=6, num_image_tokens=19, image_fmap_size=3, dim=16, depth=1, heads=2, dim_head=8
)


@pytest.fixture(scope="module")
def model() -> DALLE:
    torch.manual_seed(0)
    return DALLE(CONFIG).eval()


def good_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[1, 2, 3, 0, 0, 0]]), torch.zeros(1, CONFIG.image_seq_len, dtype=torch.long)


def calls(model: DALLE, text: torch.Tensor, image: torch.Tensor):
    return [lambda: model(text, image), lambda: model.loss(text, image)]


def check(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("bad", [23, 24, 30, -1])
def test_text_id_out_of_vocabulary(model: DALLE, bad: int) -> None:
    # 23..28 would silently hit the per-position padding rows of the embedding: they must be rejected too.
    text, image = good_inputs()
    text[0, 1] = bad
    for call in [*calls(model, text, image), lambda: model.generate_image_ids(text)]:
        with pytest.raises(VocabularyError) as error:
            call()
        check(error, "num_text_tokens", "23", str(bad))


@pytest.mark.parametrize("bad", [19, -3])
def test_image_id_out_of_vocabulary(model: DALLE, bad: int) -> None:
    text, image = good_inputs()
    image[0, -1] = bad  # even the last image id, which is only a target
    for call in calls(model, text, image):
        with pytest.raises(VocabularyError) as error:
            call()
        check(error, "num_image_tokens", "19", str(bad))


def test_text_too_long(model: DALLE) -> None:
    _, image = good_inputs()
    long_text = torch.ones(1, 7, dtype=torch.long)
    for call in [*calls(model, long_text, image), lambda: model.generate_image_ids(long_text)]:
        with pytest.raises(ShapeError) as error:
            call()
        check(error, "text_seq_len=6", "7")


@pytest.mark.parametrize("length", [8, 10])
def test_image_wrong_length(model: DALLE, length: int) -> None:
    text, _ = good_inputs()
    image = torch.zeros(1, length, dtype=torch.long)
    for call in calls(model, text, image):
        with pytest.raises(ShapeError) as error:
            call()
        check(error, "9", str(length))


def test_wrong_rank_dtype_and_batch(model: DALLE) -> None:
    text, image = good_inputs()
    with pytest.raises(ShapeError):
        model(text[0], image)
    with pytest.raises(ShapeError):
        model(text.float(), image)
    with pytest.raises(ShapeError):
        model(text, image.float())
    with pytest.raises(ShapeError) as error:
        model(text.repeat(2, 1), image)
    check(error, "[2, 9]", "[1, 9]")


def test_sampling_arguments(model: DALLE) -> None:
    text, _ = good_inputs()
    for kwargs, field in [({"top_k": 0}, "top_k"), ({"top_k": 20}, "top_k"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(ConfigError) as error:
            model.generate_image_ids(text, **kwargs)
        check(error, field)
    with pytest.raises(ConfigError) as error:
        model.generate_image_ids(text, top_k=20)
    check(error, "19")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_text_tokens", 0),
        ("text_seq_len", -1),
        ("num_image_tokens", 1.5),
        ("image_fmap_size", True),
        ("dim", 0),
        ("depth", 0),
        ("heads", 0),
        ("dim_head", 0),
        ("ff_mult", 0),
        ("text_pad_id", 23),
        ("text_pad_id", -1),
        ("attn_dropout", 1.0),
        ("ff_dropout", -0.1),
        ("loss_img_weight", -1.0),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    data = {**to_dict(CONFIG), field: value}
    with pytest.raises(ConfigError) as error:
        DALLEConfig(**data)
    check(error, field)
    with pytest.raises(ConfigError) as error:
        from_dict(DALLEConfig, data)
    check(error, field)


def test_config_properties_and_dict_roundtrip() -> None:
    assert CONFIG.image_seq_len == 9 and CONFIG.total_seq_len == 15 and CONFIG.num_text_logits == 29
    assert from_dict(DALLEConfig, to_dict(CONFIG)) == CONFIG
    assert DALLEConfig.from_dict(CONFIG.to_dict()) == CONFIG
    with pytest.raises(ConfigError) as error:
        from_dict(DALLEConfig, {**to_dict(CONFIG), "dimm": 3})
    check(error, "dimm")


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"top_p": 0.0}, ["top_p", "(0, 1]"]),
        ({"top_p": 1.5}, ["top_p", "1.5"]),
        ({"top_k": 3, "top_k_fraction": 0.5}, ["top_k", "top_k_fraction"]),
        ({"top_k_fraction": 0.0}, ["top_k_fraction", "(0, 1]"]),
        ({"cond_scale": -1.0}, ["cond_scale", ">= 0"]),
        ({"cond_scale": float("nan")}, ["cond_scale"]),
        ({"callback_every": 0}, ["callback_every"]),
        ({"callback": 3}, ["callback"]),
        ({"num_init_img_tokens": 2}, ["num_init_img_tokens", "init_image_ids"]),
        (
            {"init_image_ids": torch.zeros(1, 9, dtype=torch.long), "num_init_img_tokens": 9},
            ["num_init_img_tokens", "[0, 8]"],
        ),
        (
            {"init_image_ids": torch.zeros(1, 4, dtype=torch.long), "num_init_img_tokens": 5},
            ["num_init_img_tokens", "[0, 4]"],
        ),
        ({"temperature": float("inf")}, ["temperature"]),
    ],
)
def test_generation_options_are_checked(model: DALLE, kwargs: dict, needles: list[str]) -> None:
    text, _ = good_inputs()
    with pytest.raises(ConfigError) as error:
        model.generate_image_ids(text, **kwargs)
    check(error, *needles)


def test_priming_ids_are_checked(model: DALLE) -> None:
    text, _ = good_inputs()
    for init, error_type, needles in [
        (torch.full((1, 9), 19), VocabularyError, ["num_image_tokens", "19"]),
        (torch.full((1, 3), -2), VocabularyError, ["num_image_tokens", "-2"]),
        (torch.zeros(1, 10, dtype=torch.long), ShapeError, ["image_seq_len=9", "[1, 10]"]),
        (torch.zeros(2, 4, dtype=torch.long), ShapeError, ["[1, <= image_seq_len=9]", "[2, 4]"]),
        (torch.zeros(1, 4), ShapeError, ["init_image_ids", "float32"]),
    ]:
        with pytest.raises(error_type) as error:
            model.generate_image_ids(text, init_image_ids=init)
        check(error, *needles)
    cache = model.new_cache(1)
    with pytest.raises(ShapeError) as error:
        model.prefill(text, cache, image_prefix=torch.zeros(1, 9, dtype=torch.long))
    check(error, "image_seq_len=9", "9")


def test_text_completion_inputs_are_checked(model: DALLE) -> None:
    with pytest.raises(VocabularyError) as error:
        model.generate_text_ids(torch.tensor([[1, 40]]))
    check(error, "num_text_tokens", "40")
    with pytest.raises(ShapeError) as error:
        model.generate_text_ids(torch.ones(1, 7, dtype=torch.long))
    check(error, "text_seq_len=6", "7")
    with pytest.raises(ConfigError) as error:
        model.generate_text_ids(torch.ones(1, 2, dtype=torch.long), top_k=30)
    check(error, "top_k", "29")  # the text vocabulary with its per-position padding tokens


def test_attention_backend_is_checked(model: DALLE) -> None:
    with pytest.raises(ConfigError) as error:
        model.set_attention_backend("fast")
    check(error, "backend", "fast")


def test_row_generators_are_checked(model: DALLE) -> None:
    text, _ = good_inputs()
    g = torch.Generator()
    for kwargs, needle in [
        ({"row_generators": [g, g]}, "one generator per row (1), got 2"),
        ({"row_generators": [g], "generator": g}, "at most one"),
        ({"row_generators": [3]}, "torch.Generator"),
    ]:
        with pytest.raises(ConfigError) as error:
            model.generate_image_ids(text, **kwargs)
        check(error, "row_generators", needle)
