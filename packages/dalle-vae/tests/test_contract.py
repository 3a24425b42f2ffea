"""The shared ImageTokenizer contract, plus tokenizer behaviour specific to the discrete VAE."""

from __future__ import annotations

import pytest
import torch

from dalle_core import ImageTokenizer, ShapeError, VocabularyError
from dalle_core.testing import ImageTokenizerContract
from dalle_vae import DiscreteVAE, DiscreteVAEConfig


def _tiny() -> DiscreteVAE:
    torch.manual_seed(0)
    config = DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=16)
    return DiscreteVAE(config).eval()


class TestDiscreteVAEContract(ImageTokenizerContract):
    def make_image_tokenizer(self) -> ImageTokenizer:
        return _tiny()


def test_properties_follow_config() -> None:
    model = _tiny()
    assert (model.kind, model.num_tokens, model.image_size, model.channels, model.fmap_size) == (
        "discrete_vae",
        32,
        16,
        3,
        4,
    )
    assert model.config.fmap_size == 4


def test_encode_is_argmax_of_logits_row_major() -> None:
    model = _tiny()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    logits = model.logits(images)
    assert logits.shape == (2, 32, 4, 4) and logits.requires_grad
    ids = model.encode(images)
    assert not ids.requires_grad
    for row in range(4):
        for col in range(4):
            assert torch.equal(ids[:, row * 4 + col], logits[:, :, row, col].argmax(dim=1))


def test_encode_and_decode_do_not_depend_on_train_mode() -> None:
    model = _tiny()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ids = model.encode(images)
    decoded = model.decode(ids)
    model.train()
    assert torch.equal(model.encode(images), ids)
    assert torch.equal(model.decode(ids), decoded)


def test_decode_is_codebook_then_decoder_clamped() -> None:
    model = _tiny()
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(5))
    codes = model.codebook.weight[ids].view(2, 4, 4, 16).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = model.decoder(codes).clamp(0, 1)
    assert torch.allclose(model.decode(ids), expected)
    # Any integer dtype is accepted.
    assert torch.allclose(model.decode(ids.to(torch.int32)), expected)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 3, 16), torch.float32),
        ((2, 3, 16, 16, 1), torch.float32),
        ((2, 1, 16, 16), torch.float32),
        ((2, 3, 16, 8), torch.float32),
        ((2, 3, 32, 32), torch.float32),
        ((2, 3, 16, 16), torch.uint8),
    ],
)
def test_bad_images_raise_one_line_shape_error(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    model = _tiny()
    images = torch.zeros(shape, dtype=dtype)
    for method in (model.encode, model.logits, model.loss):
        with pytest.raises(ShapeError) as info:
            method(images)
        message = str(info.value)
        assert len(message.splitlines()) == 1
        assert ("[B, 3, 16, 16]" in message and str(tuple(shape)) in message) or "dtype" in message


def test_bad_ids_raise() -> None:
    model = _tiny()
    with pytest.raises(ShapeError, match=r"\[B, 16\].*\(2, 17\)"):
        model.decode(torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ShapeError, match=r"\(16,\)"):
        model.decode(torch.zeros(16, dtype=torch.long))
    with pytest.raises(ShapeError, match="dtype"):
        model.decode(torch.zeros(1, 16))
    ids = torch.zeros(1, 16, dtype=torch.long)
    ids[0, 5] = 32
    with pytest.raises(VocabularyError, match=r"32.*num_tokens=32"):
        model.decode(ids)
    ids[0, 5] = -3
    with pytest.raises(VocabularyError, match="-3"):
        model.decode(ids)


def test_encode_does_not_track_gradients_even_when_input_does() -> None:
    model = _tiny()
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    ids = model.encode(images)
    assert ids.dtype == torch.int64 and not ids.requires_grad
    assert images.grad is None
