"""Contract tests for :class:`ImageTokenizer` and :class:`TextTokenizer` implementations.

Subclass a mixin in a pytest test class and implement its factory; every test then runs against your implementation::

    class TestMyVAE(ImageTokenizerContract):
        def make_image_tokenizer(self):
            return MyVAE(...)

A third-party package runs the same tests to prove it plugs into dalle. The mixins need pytest only at test time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dalle_core import registry
from dalle_core.errors import ShapeError, TextTooLongError, VocabularyError
from dalle_core.protocols import ImageTokenizer, TextTokenizer


def _raises(error_type: type[BaseException], function, *args, **kwargs) -> BaseException:
    try:
        function(*args, **kwargs)
    except error_type as error:
        return error
    raise AssertionError(f"expected {error_type.__name__} from {getattr(function, '__name__', function)}")


class ImageTokenizerContract:
    """Tests every image tokenizer must pass. Implement :meth:`make_image_tokenizer`."""

    batch_size = 3

    def make_image_tokenizer(self) -> ImageTokenizer:
        raise NotImplementedError

    def _images(self, tokenizer: ImageTokenizer, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        size = tokenizer.image_size
        return torch.rand(self.batch_size, tokenizer.channels, size, size, generator=generator)

    def test_satisfies_protocol(self) -> None:
        tokenizer = self.make_image_tokenizer()
        assert isinstance(tokenizer, ImageTokenizer)
        assert isinstance(tokenizer.kind, str) and tokenizer.kind
        for name in ("num_tokens", "image_size", "channels", "fmap_size"):
            value = getattr(tokenizer, name)
            assert isinstance(value, int) and value > 0, f"{name} must be a positive int, got {value!r}"
        assert tokenizer.image_size % tokenizer.fmap_size == 0

    def test_encode_shape_dtype_range(self) -> None:
        tokenizer = self.make_image_tokenizer()
        ids = tokenizer.encode(self._images(tokenizer))
        assert ids.dtype == torch.int64
        assert ids.shape == (self.batch_size, tokenizer.fmap_size**2)
        assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.num_tokens

    def test_encode_is_deterministic_and_batch_independent(self) -> None:
        tokenizer = self.make_image_tokenizer()
        images = self._images(tokenizer)
        batched = tokenizer.encode(images)
        assert torch.equal(batched, tokenizer.encode(images))
        one_by_one = torch.cat([tokenizer.encode(images[i : i + 1]) for i in range(self.batch_size)])
        assert torch.equal(batched, one_by_one)

    def test_encode_leaves_input_unchanged(self) -> None:
        tokenizer = self.make_image_tokenizer()
        images = self._images(tokenizer)
        before = images.clone()
        tokenizer.encode(images)
        assert torch.equal(images, before)

    def test_decode_shape_dtype_range(self) -> None:
        tokenizer = self.make_image_tokenizer()
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, tokenizer.num_tokens, (self.batch_size, tokenizer.fmap_size**2), generator=generator)
        images = tokenizer.decode(ids)
        assert images.dtype == torch.float32
        assert images.shape == (self.batch_size, tokenizer.channels, tokenizer.image_size, tokenizer.image_size)
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
        # Different codes must give different pictures, or the decoder ignores its input.
        assert not torch.allclose(images[0], images[1])

    def test_wrong_image_size_raises(self) -> None:
        tokenizer = self.make_image_tokenizer()
        size = tokenizer.image_size
        error = _raises(ShapeError, tokenizer.encode, torch.rand(1, tokenizer.channels, size + 1, size + 1))
        assert str(size) in str(error) and len(str(error).splitlines()) == 1
        _raises(ShapeError, tokenizer.encode, torch.rand(1, tokenizer.channels + 1, size, size))
        _raises(ShapeError, tokenizer.encode, torch.rand(tokenizer.channels, size, size))

    def test_out_of_range_ids_raise(self) -> None:
        tokenizer = self.make_image_tokenizer()
        seq = tokenizer.fmap_size**2
        error = _raises(VocabularyError, tokenizer.decode, torch.full((1, seq), tokenizer.num_tokens))
        assert str(tokenizer.num_tokens) in str(error)
        _raises(VocabularyError, tokenizer.decode, torch.full((1, seq), -1))
        _raises(ShapeError, tokenizer.decode, torch.zeros(1, seq + 1, dtype=torch.long))

    def test_save_and_load_roundtrip(self, tmp_path: Path) -> None:
        tokenizer = self.make_image_tokenizer()
        tokenizer.save(tmp_path / "image_tokenizer")
        loaded = registry.load_image_tokenizer(tmp_path / "image_tokenizer")
        assert loaded.kind == tokenizer.kind
        images = self._images(tokenizer, seed=2)
        ids = tokenizer.encode(images)
        assert torch.equal(loaded.encode(images), ids)
        assert torch.allclose(loaded.decode(ids), tokenizer.decode(ids))


class TextTokenizerContract:
    """Tests every text tokenizer must pass. Implement :meth:`make_text_tokenizer`.

    ``sample_texts`` must round-trip through encode/decode up to :meth:`normalize` (override it for tokenizers that
    lowercase or collapse whitespace).
    """

    sample_texts: tuple[str, ...] = ("a large red circle at the top left", "hello world", "x")
    context_length = 48

    def make_text_tokenizer(self) -> TextTokenizer:
        raise NotImplementedError

    def normalize(self, text: str) -> str:
        return text

    def test_satisfies_protocol(self) -> None:
        tokenizer = self.make_text_tokenizer()
        assert isinstance(tokenizer, TextTokenizer)
        assert isinstance(tokenizer.kind, str) and tokenizer.kind
        assert isinstance(tokenizer.vocab_size, int) and tokenizer.vocab_size > 1
        assert 0 <= tokenizer.pad_id < tokenizer.vocab_size

    def test_encode_shape_dtype_range(self) -> None:
        tokenizer = self.make_text_tokenizer()
        ids = tokenizer.encode(list(self.sample_texts), self.context_length)
        assert ids.dtype == torch.int64
        assert ids.shape == (len(self.sample_texts), self.context_length)
        assert int(ids.min()) >= 0 and int(ids.max()) < tokenizer.vocab_size

    def test_rows_end_in_padding(self) -> None:
        tokenizer = self.make_text_tokenizer()
        ids = tokenizer.encode(list(self.sample_texts), self.context_length)
        for row in ids:
            padding = (row == tokenizer.pad_id).nonzero()
            assert len(padding) > 0, "every sample text is shorter than the context, so each row must have padding"
            first = int(padding[0])
            assert bool((row[first:] == tokenizer.pad_id).all()), "padding must fill the end of the row"
            assert first > 0, "a non-empty text must produce at least one id"

    def test_roundtrip(self) -> None:
        tokenizer = self.make_text_tokenizer()
        ids = tokenizer.encode(list(self.sample_texts), self.context_length)
        assert tokenizer.decode(ids) == [self.normalize(text) for text in self.sample_texts]

    def test_empty_text_is_all_padding(self) -> None:
        tokenizer = self.make_text_tokenizer()
        ids = tokenizer.encode([""], 8)
        assert bool((ids == tokenizer.pad_id).all())
        assert tokenizer.decode(ids) == [""]

    def test_too_long_raises_unless_truncated(self) -> None:
        tokenizer = self.make_text_tokenizer()
        text = " ".join(["word"] * 64)
        error = _raises(TextTooLongError, tokenizer.encode, [text], 4)
        message = str(error)
        assert "4" in message and len(message.splitlines()) == 1
        truncated = tokenizer.encode([text], 4, truncate=True)
        assert truncated.shape == (1, 4)
        assert bool((truncated != tokenizer.pad_id).all())
        assert torch.equal(truncated[0], tokenizer.encode([text], 400)[0, :4])

    def test_save_and_load_roundtrip(self, tmp_path: Path) -> None:
        tokenizer = self.make_text_tokenizer()
        tokenizer.save(tmp_path / "text_tokenizer")
        loaded = registry.load_text_tokenizer(tmp_path / "text_tokenizer")
        assert loaded.kind == tokenizer.kind and loaded.vocab_size == tokenizer.vocab_size
        assert loaded.pad_id == tokenizer.pad_id
        texts = list(self.sample_texts)
        assert torch.equal(loaded.encode(texts, self.context_length), tokenizer.encode(texts, self.context_length))
