"""OpenAI's pretrained dVAE (the tokenizer of the original DALL·E) as a dalle ImageTokenizer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import cast

import torch
from torch import nn

from dalle_core.errors import CheckpointError, ConfigError
from dalle_vae.checks import check_ids, check_images, ids_to_grid
from dalle_vae.directory import load_tokenizer_model, save_tokenizer_dir
from dalle_vae.openai_dvae.config import OpenAIDVAEConfig
from dalle_vae.openai_dvae.layers import OpenAIDecoder, OpenAIEncoder
from dalle_vae.openai_dvae.pickle_import import (
    DECODER_CLASS,
    ENCODER_CLASS,
    hyperparameter,
    load_into,
    read_dall_e_pickle,
)

# The logit-Laplace pixel map keeps pixels inside [eps, 1 - eps], away from the sigmoid's saturated ends.
LOGIT_LAPLACE_EPS = 0.1
ENCODER_URL = "https://cdn.openai.com/dall-e/encoder.pkl"
DECODER_URL = "https://cdn.openai.com/dall-e/decoder.pkl"


def map_pixels(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` pixels -> ``[eps, 1 - eps]``, what OpenAI's encoder was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * images + LOGIT_LAPLACE_EPS


def unmap_pixels(images: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to ``[0, 1]``."""
    return torch.clamp((images - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


def default_cache_dir() -> Path:
    """``$DALLE_CACHE_DIR`` or ``~/.cache/dalle``, where DALLE-pytorch keeps the OpenAI files it downloaded."""
    return Path(os.environ.get("DALLE_CACHE_DIR") or Path.home() / ".cache" / "dalle").expanduser()


class OpenAIDiscreteVAE(nn.Module):
    """OpenAI's dVAE: ``[0, 1]`` images -> a ``fmap_size x fmap_size`` grid of ``vocab_size`` codes -> images.

    Build it from OpenAI's files with :meth:`from_openai_pickles` (nothing is downloaded), or from a directory written
    by :meth:`save` with :meth:`load` / ``dalle_core.registry.load_image_tokenizer``. ``OpenAIDiscreteVAE(config)``
    gives random weights. ``encode`` is the argmax of the encoder's logits on :func:`map_pixels`'d images;
    ``decode`` passes one-hot codes through the decoder, whose first ``channels`` outputs are sigmoid'ed and
    :func:`unmap_pixels`'d (the other ``channels`` are the logit-Laplace scales, unused), as in DALLE-pytorch.
    """

    kind = "openai_dvae"

    def __init__(self, config: OpenAIDVAEConfig | None = None) -> None:
        super().__init__()
        config = OpenAIDVAEConfig() if config is None else config
        if not isinstance(config, OpenAIDVAEConfig):
            raise ConfigError(f"config must be an OpenAIDVAEConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = OpenAIEncoder(config)
        self.decoder = OpenAIDecoder(config)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.config.vocab_size

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def channels(self) -> int:
        return self.config.channels

    @property
    def fmap_size(self) -> int:
        return self.config.fmap_size

    def _weight(self) -> torch.Tensor:
        return cast(nn.Conv2d, self.encoder.blocks.get_submodule("input")).weight

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> code logits ``float[B, vocab_size, S / 8, S / 8]``."""
        images = check_images(images, channels=self.channels, image_size=self.image_size, like=self._weight())
        return self.encoder(map_pixels(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> ``int64[B, fmap_size**2]``, row-major."""
        return self.logits(images).argmax(dim=1).flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``int[B, fmap_size**2]`` -> ``float32[B, C, S, S]`` in ``[0, 1]``."""
        ids = check_ids(ids, fmap_size=self.fmap_size, num_tokens=self.num_tokens, device=self._weight().device)
        statistics = self.decoder(ids_to_grid(ids, self.fmap_size))
        return unmap_pixels(torch.sigmoid(statistics[:, : self.channels])).float()

    def save(self, directory: str | Path) -> None:
        """Write ``spec.json``, ``config.json`` and ``model.safetensors`` (our format; no pickle)."""
        save_tokenizer_dir(directory, self.kind, self.state_dict(), self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> OpenAIDiscreteVAE:
        """Rebuild a tokenizer written by :meth:`save`."""
        return load_tokenizer_model(cls, OpenAIDVAEConfig.from_dict, directory)

    @classmethod
    def from_openai_pickles(
        cls,
        location: str | Path | None = None,
        *,
        decoder: str | Path | None = None,
        image_size: int = 256,
    ) -> OpenAIDiscreteVAE:
        """Load OpenAI's ``encoder.pkl`` and ``decoder.pkl`` (local files only; nothing is downloaded).

        ``location`` is a directory holding both files (default :func:`default_cache_dir`, DALLE-pytorch's cache) or
        the path of ``encoder.pkl``; ``decoder`` is the decoder's path when it is not ``decoder.pkl`` beside it. The
        pickles are read without running the ``dall_e`` package's code (see
        :mod:`dalle_vae.openai_dvae.pickle_import`). ``image_size`` is the size ``encode`` accepts.
        """
        encoder_path, decoder_path = _resolve_paths(location, decoder)
        encoder_tree = read_dall_e_pickle(encoder_path, ENCODER_CLASS)
        decoder_tree = read_dall_e_pickle(decoder_path, DECODER_CLASS)
        input_channels = hyperparameter(encoder_tree, "input_channels", encoder_path)
        output_channels = hyperparameter(decoder_tree, "output_channels", decoder_path)
        encoder_vocab = hyperparameter(encoder_tree, "vocab_size", encoder_path)
        decoder_vocab = hyperparameter(decoder_tree, "vocab_size", decoder_path)
        if (input_channels, encoder_vocab) != (output_channels, decoder_vocab):
            raise CheckpointError(
                f"{encoder_path} and {decoder_path} do not belong together: encoder has {input_channels} channels "
                f"and {encoder_vocab} codes, decoder {output_channels} channels and {decoder_vocab} codes"
            )
        try:
            config = OpenAIDVAEConfig(
                image_size=image_size,
                channels=input_channels,
                vocab_size=encoder_vocab,
                encoder_hidden=hyperparameter(encoder_tree, "n_hid", encoder_path),
                encoder_blocks_per_group=hyperparameter(encoder_tree, "n_blk_per_group", encoder_path),
                decoder_init=hyperparameter(decoder_tree, "n_init", decoder_path),
                decoder_hidden=hyperparameter(decoder_tree, "n_hid", decoder_path),
                decoder_blocks_per_group=hyperparameter(decoder_tree, "n_blk_per_group", decoder_path),
            )
        except ConfigError as error:
            raise CheckpointError(f"{encoder_path}, {decoder_path}: {error}") from None
        model = cls(config)
        load_into(model.encoder, encoder_tree, ENCODER_CLASS, encoder_path)
        load_into(model.decoder, decoder_tree, DECODER_CLASS, decoder_path)
        return model


def _resolve_paths(location: str | Path | None, decoder: str | Path | None) -> tuple[Path, Path]:
    location = default_cache_dir() if location is None else Path(location).expanduser()
    encoder_path = location / "encoder.pkl" if location.is_dir() or location.suffix == "" else location
    decoder_path = Path(decoder).expanduser() if decoder is not None else encoder_path.parent / "decoder.pkl"
    missing = [str(path) for path in (encoder_path, decoder_path) if not path.is_file()]
    if missing:
        raise CheckpointError(
            f"OpenAI dVAE weights not found: {', '.join(missing)}; download {ENCODER_URL} and {DECODER_URL} "
            f"into {encoder_path.parent} (DALLE-pytorch's cache ~/.cache/dalle holds them if it ever used them)"
        )
    return encoder_path, decoder_path
