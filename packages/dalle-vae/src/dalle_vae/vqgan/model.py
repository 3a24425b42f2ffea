"""A taming-transformers VQGAN (``VQModel`` or ``GumbelVQ``) as a dalle ImageTokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dalle_core.errors import CheckpointError, ConfigError
from dalle_vae.checks import check_ids, check_images, ids_to_grid
from dalle_vae.directory import load_state_strictly, load_tokenizer_model, save_tokenizer_dir
from dalle_vae.openai_dvae.model import default_cache_dir
from dalle_vae.vqgan.config import VQGanConfig
from dalle_vae.vqgan.layers import Decoder, Encoder
from dalle_vae.vqgan.quantizers import GumbelQuantizer, VectorQuantizer
from dalle_vae.vqgan.taming_import import read_taming_state_dict, read_taming_yaml

# The files DALLE-pytorch downloads for its default VQGAN (ImageNet f16, 1024 codes) into its cache.
DALLE_PYTORCH_CHECKPOINT = "vqgan.1024.model.ckpt"
DALLE_PYTORCH_CONFIG = "vqgan.1024.config.yml"


class VQGanVAE(nn.Module):
    """``[0, 1]`` images -> a ``fmap_size x fmap_size`` grid of ``n_embed`` codes -> ``[0, 1]`` images.

    Images are mapped to ``[-1, 1]`` for the encoder, and the decoder's output is clamped to ``[-1, 1]`` and mapped
    back, as DALLE-pytorch's ``VQGanVAE`` does. For a Gumbel quantizer, ``encode`` is the noise-free argmax by default
    (deterministic); ``encode(images, sample=True)`` draws codes the way taming's ``GumbelQuantize`` does.

    Build it from taming files with :meth:`from_taming`, from :meth:`save`'s directory with :meth:`load`, or with
    random weights from a :class:`VQGanConfig`.
    """

    kind = "vqgan"

    def __init__(self, config: VQGanConfig) -> None:
        super().__init__()
        if not isinstance(config, VQGanConfig):
            raise ConfigError(f"config must be a VQGanConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.quantize: VectorQuantizer | GumbelQuantizer
        if config.quantizer == "gumbel":
            self.quantize = GumbelQuantizer(config.n_embed, config.embed_dim)
        else:
            self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.eval()

    @property
    def num_tokens(self) -> int:
        return self.config.n_embed

    @property
    def image_size(self) -> int:
        return self.config.size

    @property
    def channels(self) -> int:
        return self.config.in_channels

    @property
    def fmap_size(self) -> int:
        return self.config.fmap_size

    def _weight(self) -> torch.Tensor:
        return self.quant_conv.weight

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> pre-quantization features ``[B, embed_dim, f, f]``."""
        images = check_images(images, channels=self.channels, image_size=self.image_size, like=self._weight())
        return self.quant_conv(self.encoder(2 * images - 1))

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``float[B, C, S, S]`` in ``[0, 1]`` -> ``int64[B, fmap_size**2]``, row-major.

        ``sample`` (Gumbel quantizers only) adds Gumbel noise to the logits before the argmax, from ``generator``.
        """
        features = self.features(images)
        if isinstance(self.quantize, GumbelQuantizer):
            codes = self.quantize.codes(features, sample=sample, generator=generator)
        elif sample:
            raise ConfigError("sample=True needs a Gumbel quantizer; this VQGAN picks the nearest code")
        else:
            codes = self.quantize.codes(features)
        return codes.flatten(1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """``int[B, fmap_size**2]`` -> ``float32[B, C, S, S]`` in ``[0, 1]``."""
        ids = check_ids(ids, fmap_size=self.fmap_size, num_tokens=self.num_tokens, device=self._weight().device)
        vectors = self.quantize.vectors(ids_to_grid(ids, self.fmap_size))
        output = self.decoder(self.post_quant_conv(vectors))
        return ((output.clamp(-1.0, 1.0) + 1) * 0.5).float()

    def save(self, directory: str | Path) -> None:
        """Write ``spec.json``, ``config.json`` and ``model.safetensors`` (our format; no pickle)."""
        save_tokenizer_dir(directory, self.kind, self.state_dict(), self.config.to_dict())

    @classmethod
    def load(cls, directory: str | Path) -> VQGanVAE:
        """Rebuild a tokenizer written by :meth:`save`."""
        return load_tokenizer_model(cls, VQGanConfig.from_dict, directory)

    @classmethod
    def from_taming(
        cls,
        checkpoint: str | Path | None = None,
        config: str | Path | None = None,
        *,
        image_size: int | None = None,
        trust_pickle: bool = False,
    ) -> VQGanVAE:
        """Load a taming-transformers ``.ckpt`` with its ``.yaml`` (local files only; nothing is downloaded).

        Both default to DALLE-pytorch's cached ImageNet f16-1024 files (``vqgan.1024.model.ckpt`` and
        ``vqgan.1024.config.yml`` in :func:`dalle_vae.openai_dvae.default_cache_dir`). Weights load strictly: a
        missing or unexpected key is a CheckpointError (training-only ``loss.*`` keys are dropped). The checkpoint is
        read without running code from it unless ``trust_pickle``. ``image_size`` defaults to the config's
        ``resolution``.
        """
        cache = default_cache_dir()
        checkpoint = Path(checkpoint).expanduser() if checkpoint is not None else cache / DALLE_PYTORCH_CHECKPOINT
        config = Path(config).expanduser() if config is not None else cache / DALLE_PYTORCH_CONFIG
        missing = [str(path) for path in (checkpoint, config) if not path.is_file()]
        if missing:
            raise CheckpointError(
                f"VQGAN files not found: {', '.join(missing)}; download a model's checkpoint (.ckpt) and config "
                "(.yaml) from the taming-transformers README (e.g. vqgan_imagenet_f16_1024) and pass their paths"
            )
        model = cls(read_taming_yaml(config, image_size=image_size))
        load_state_strictly(model, read_taming_state_dict(checkpoint, trust_pickle=trust_pickle), checkpoint)
        return model
