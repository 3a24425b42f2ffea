"""The DALLE transformer: a decoder-only model over ``[BOS, text ids, image ids]``.

Layout (as in DALLE-pytorch): the transformer reads ``[BOS, text_1..text_T, image_1..image_{N-1}]`` (``T + N``
positions) and predicts ``text_1..text_T, image_1..image_N``. Each text position holding ``text_pad_id`` is replaced by
its own padding token ``num_text_tokens + i``, so the model can tell padding positions apart; those are also the text
targets there. Only the logits a position can use are computed: text positions use the text rows of ``to_logits``,
image positions the image rows.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from dalle_core.checkpoint import CONFIG_FILE, atomic_directory, load_weights, read_json, save_weights
from dalle_core.config import from_dict, to_dict
from dalle_core.errors import CheckpointError, ConfigError, ShapeError, VocabularyError
from dalle_transformer.attention import CausalSelfAttention
from dalle_transformer.cache import KVCache
from dalle_transformer.config import DALLEConfig
from dalle_transformer.sampling import check_sampling_args, sample_logits

CHECKPOINT_FORMAT = "dalle-transformer/1"


class DALLEOutput(NamedTuple):
    text_logits: torch.Tensor  # [B, T, num_text_tokens + text_seq_len]: predictions of text_1..text_T
    image_logits: torch.Tensor  # [B, N, num_image_tokens]: predictions of image_1..image_N
    loss: torch.Tensor  # (text_loss + loss_img_weight * image_loss) / (loss_img_weight + 1)
    text_loss: torch.Tensor  # mean cross-entropy over the T text targets (padding targets included)
    image_loss: torch.Tensor  # mean cross-entropy over the N image targets


class DALLELoss(NamedTuple):
    loss: torch.Tensor  # (text_loss + loss_img_weight * image_loss) / (loss_img_weight + 1)
    text_loss: torch.Tensor
    image_loss: torch.Tensor


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(norm(x))`` then ``x + ff(norm(x))``."""

    def __init__(self, config: DALLEConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config.dim, config.heads, config.dim_head, config.attn_dropout)
        self.ff_norm = nn.LayerNorm(config.dim)
        self.ff = FeedForward(config.dim, config.ff_mult, config.ff_dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_index: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cache, layer_index)
        return x + self.ff(self.ff_norm(x))


class DALLE(nn.Module):
    """Autoregressive transformer over text and image token ids (never over text or images themselves)."""

    # Buffers, declared so type checkers know they are tensors (nn.Module.__getattr__ says Tensor | Module).
    image_rows: torch.Tensor
    image_cols: torch.Tensor
    text_pad_ids: torch.Tensor

    def __init__(self, config: DALLEConfig) -> None:
        super().__init__()
        if not isinstance(config, DALLEConfig):
            raise ConfigError(f"DALLE: expected a DALLEConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.bos = nn.Parameter(torch.zeros(dim))
        self.text_emb = nn.Embedding(config.num_text_logits, dim)
        self.text_pos_emb = nn.Embedding(config.text_seq_len, dim)
        self.image_emb = nn.Embedding(config.num_image_tokens, dim)
        self.image_row_emb = nn.Embedding(config.image_fmap_size, dim)
        self.image_col_emb = nn.Embedding(config.image_fmap_size, dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, config.num_text_logits + config.num_image_tokens)

        positions = torch.arange(config.image_seq_len)
        self.register_buffer("image_rows", positions // config.image_fmap_size, persistent=False)
        self.register_buffer("image_cols", positions % config.image_fmap_size, persistent=False)
        pad_ids = config.num_text_tokens + torch.arange(config.text_seq_len)
        self.register_buffer("text_pad_ids", pad_ids, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-style init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.bos, std=0.02)
        residual_std = 0.02 / (2 * self.config.depth) ** 0.5
        for block in self.blocks:
            assert isinstance(block, Block)  # narrows ModuleList items for type checkers
            last = block.ff.net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.normal_(block.attn.to_out.weight, std=residual_std)
            nn.init.normal_(last.weight, std=residual_std)

    # ---------------------------------------------------------------- input checks

    def prepare_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Validate ``int[B, <=T]`` text ids; return ``int64[B, T]`` padded, with padding as per-position ids.

        The result holds ids in ``[0, num_text_tokens + text_seq_len)``: the model's text inputs and text targets.
        """
        config = self.config
        if not isinstance(text_ids, torch.Tensor) or text_ids.dim() != 2 or not _is_integer(text_ids):
            raise ShapeError(
                f"expected text ids as an integer tensor [batch, <= {config.text_seq_len}], got {_desc(text_ids)}"
            )
        if text_ids.shape[1] > config.text_seq_len:
            raise ShapeError(
                f"text is too long: expected at most text_seq_len={config.text_seq_len} ids, got {text_ids.shape[1]}"
            )
        _check_range(text_ids, config.num_text_tokens, "text", "num_text_tokens")
        text = text_ids.to(device=self.text_pad_ids.device, dtype=torch.long)
        if text.shape[1] < config.text_seq_len:
            text = F.pad(text, (0, config.text_seq_len - text.shape[1]), value=config.text_pad_id)
        return torch.where(text == config.text_pad_id, self.text_pad_ids, text)

    def check_image_ids(self, image_ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Validate ``int[B, image_seq_len]`` image ids; return them as int64 on the model's device."""
        config = self.config
        expected = f"[{batch_size if batch_size is not None else 'batch'}, {config.image_seq_len}]"
        if not isinstance(image_ids, torch.Tensor) or image_ids.dim() != 2 or not _is_integer(image_ids):
            raise ShapeError(f"expected image ids as an integer tensor {expected}, got {_desc(image_ids)}")
        if image_ids.shape[1] != config.image_seq_len or batch_size not in (None, image_ids.shape[0]):
            raise ShapeError(
                f"expected image ids of shape {expected} (image_seq_len = image_fmap_size**2 = "
                f"{config.image_seq_len}), got {list(image_ids.shape)}"
            )
        _check_range(image_ids, config.num_image_tokens, "image", "num_image_tokens")
        return image_ids.to(device=self.text_pad_ids.device, dtype=torch.long)

    # ---------------------------------------------------------------- building blocks

    def _embed_prefix(self, text: torch.Tensor) -> torch.Tensor:
        """``[BOS, text_1..text_T]`` embeddings ``[B, T + 1, dim]`` from prepared text ids."""
        tokens = self.text_emb(text) + self.text_pos_emb.weight
        bos = self.bos.expand(text.shape[0], 1, -1)
        return torch.cat([bos, tokens], dim=1)

    def _embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings of image ids occupying image positions ``start..start+n`` (row + column axial positions)."""
        end = start + image.shape[1]
        position = self.image_row_emb(self.image_rows[start:end]) + self.image_col_emb(self.image_cols[start:end])
        return self.image_emb(image) + position

    def _transform(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The blocks, without the final norm (applied by the heads to the positions they need)."""
        for index, block in enumerate(self.blocks):
            x = block(x, cache, index)
        if cache is not None:
            cache.advance(x.shape[1])
        return x

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        n = self.config.num_text_logits
        return F.linear(self.norm(hidden), self.to_logits.weight[:n], self.to_logits.bias[:n])

    def _image_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        n = self.config.num_text_logits
        return F.linear(self.norm(hidden), self.to_logits.weight[n:], self.to_logits.bias[n:])

    # ---------------------------------------------------------------- training

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> DALLEOutput:
        """Teacher-forced logits for every text and image position, and the losses they give.

        ``text_ids``: ``int[B, <= text_seq_len]`` in ``[0, num_text_tokens)`` (shorter rows are padded);
        ``image_ids``: ``int[B, image_seq_len]`` in ``[0, num_image_tokens)``.
        """
        text = self.prepare_text(text_ids)
        image = self.check_image_ids(image_ids, batch_size=text.shape[0])
        x = torch.cat([self._embed_prefix(text), self._embed_image(image[:, :-1])], dim=1)
        hidden = self._transform(x)
        t = self.config.text_seq_len
        text_logits, image_logits = self._text_logits(hidden[:, :t]), self._image_logits(hidden[:, t:])
        text_loss = F.cross_entropy(_upcast(text_logits).flatten(0, 1), text.flatten())
        image_loss = F.cross_entropy(_upcast(image_logits).flatten(0, 1), image.flatten())
        weight = self.config.loss_img_weight
        loss = (text_loss + weight * image_loss) / (weight + 1)
        return DALLEOutput(text_logits, image_logits, loss, text_loss, image_loss)

    def loss(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> DALLELoss:
        """Cross-entropy means over text and image targets, combined with ``loss_img_weight``.

        Goes through ``__call__``, so module hooks (and a DDP wrapper) apply.
        """
        output = self(text_ids, image_ids)
        return DALLELoss(output.loss, output.text_loss, output.image_loss)

    # ---------------------------------------------------------------- generation

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of ``total_seq_len`` positions."""
        config = self.config
        return KVCache(
            config.depth,
            batch_size,
            config.heads,
            config.total_seq_len,
            config.dim_head,
            dtype=self.bos.dtype,
            device=self.bos.device,
        )

    def prefill(self, text_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Write ``[BOS, text]`` to an empty ``cache``; return image token 1's logits, ``[B, num_image_tokens]``."""
        if cache.length != 0:
            raise ShapeError(f"prefill expects an empty KV cache, got one holding {cache.length} positions")
        hidden = self._transform(self._embed_prefix(self.prepare_text(text_ids)), cache)
        return self._image_logits(hidden[:, -1])

    def decode_step(self, image_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image token ``k`` (``int64[B]``, already validated) after a prefill and ``k - 1`` steps; return the
        logits of image token ``k + 1``, ``[B, num_image_tokens]``."""
        position = cache.length - (self.config.text_seq_len + 1)
        if not 0 <= position < self.config.image_seq_len - 1:
            raise ShapeError(
                f"decode_step expects a cache holding {self.config.text_seq_len + 1} to "
                f"{self.config.total_seq_len - 1} positions, got {cache.length}"
            )
        hidden = self._transform(self._embed_image(image_ids[:, None], start=position), cache)
        return self._image_logits(hidden[:, -1])

    def next_image_logits(self, text_ids: torch.Tensor, image_prefix: torch.Tensor) -> torch.Tensor:
        """Without a cache: logits ``[B, num_image_tokens]`` of the image token after ``image_prefix`` (``[B, k]``,
        ``k < image_seq_len``), computing the last position's logits only."""
        prefix = self._embed_prefix(self.prepare_text(text_ids))
        hidden = self._transform(torch.cat([prefix, self._embed_image(image_prefix)], dim=1))
        return self._image_logits(hidden[:, -1])

    def generate_image_ids(
        self,
        text_ids: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample ``int64[B, image_seq_len]`` image ids conditioned on ``text_ids`` (``int[B, <= text_seq_len]``).

        ``top_k`` keeps the ``top_k`` most likely image codes at each step (ties with the last one kept too);
        ``generator`` seeds ``torch.multinomial`` (a CPU generator works for a model on any device). The cached and
        uncached paths draw the same random numbers and give the same ids for the same seed. Runs in eval mode
        (restored afterwards) under ``torch.inference_mode``; the returned tensor is an ordinary tensor.
        """
        check_sampling_args(temperature, top_k, self.config.num_image_tokens)
        text = self.prepare_text(text_ids)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                ids = self._generate(text, temperature, top_k, generator, use_cache)
        finally:
            self.train(was_training)
        return ids.clone()

    def _generate(
        self,
        text: torch.Tensor,
        temperature: float,
        top_k: int | None,
        generator: torch.Generator | None,
        use_cache: bool,
    ) -> torch.Tensor:
        batch, n = text.shape[0], self.config.image_seq_len
        out = torch.zeros(batch, n, dtype=torch.long, device=text.device)
        prefix = self._embed_prefix(text)
        cache = self.new_cache(batch) if use_cache else None
        for k in range(n):
            if cache is None:
                x = torch.cat([prefix, self._embed_image(out[:, :k])], dim=1)
            elif k == 0:
                x = prefix
            else:
                x = self._embed_image(out[:, k - 1 : k], start=k - 1)
            logits = self._image_logits(self._transform(x, cache)[:, -1])
            out[:, k] = sample_logits(logits, temperature=temperature, top_k=top_k, generator=generator)
        return out

    # ---------------------------------------------------------------- checkpoints

    def save(self, directory: str | Path, extra_config: Mapping[str, Any] | None = None) -> None:
        """Atomically replace ``directory`` with one holding ``config.json`` and ``model.safetensors``.

        ``config.json`` is ``{"format", "model": the DALLEConfig, "extra": extra_config}``. Anything else in an
        existing ``directory`` is removed; to add the model to a directory you are building (e.g. inside your own
        :func:`dalle_core.checkpoint.atomic_directory`), use :meth:`write_files`.
        """
        with atomic_directory(directory) as staging:
            self.write_files(staging, extra_config)

    def write_files(self, directory: str | Path, extra_config: Mapping[str, Any] | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` into the existing ``directory`` (not atomic by itself)."""
        extra = dict(extra_config or {})
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"extra_config: expected JSON-serialisable values, {error}") from None
        config = {"format": CHECKPOINT_FORMAT, "model": to_dict(self.config), "extra": extra}
        save_weights(directory, self.state_dict(), config)

    @classmethod
    def load(cls, directory: str | Path) -> DALLE:
        """Rebuild a model saved by :meth:`save` (on CPU, float32 parameters); keys must match exactly."""
        raw, tensors = load_weights(directory)
        if raw.get("format") != CHECKPOINT_FORMAT or not isinstance(raw.get("model"), dict):
            raise CheckpointError(
                f"{directory}: expected a config.json with format {CHECKPOINT_FORMAT!r} and a 'model' section, "
                f"got format {raw.get('format')!r}"
            )
        model = cls(from_dict(DALLEConfig, raw["model"]))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{directory}: weights do not match the config: missing keys {missing}, unexpected keys {unexpected}"
            )
        for name, tensor in tensors.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{directory}: weight {name} has shape {list(tensor.shape)}, "
                    f"expected {list(expected[name].shape)} from the config"
                )
        model.load_state_dict(tensors, strict=True)
        return model

    @staticmethod
    def read_extra_config(directory: str | Path) -> dict[str, Any]:
        """The ``extra_config`` mapping passed to :meth:`save`."""
        raw = read_json(Path(directory) / CONFIG_FILE)
        extra = raw.get("extra", {})
        return extra if isinstance(extra, dict) else {}


def _is_integer(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and tensor.dtype != torch.bool


def _desc(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _check_range(ids: torch.Tensor, size: int, kind: str, field: str) -> None:
    bad = (ids < 0) | (ids >= size)
    if bool(bad.any()):
        value = int(ids[bad][0])
        raise VocabularyError(f"{kind} ids must be in [0, {field}={size}), got {value}")


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype.itemsize < 4 else logits
