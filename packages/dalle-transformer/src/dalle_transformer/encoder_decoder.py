"""The encoder-decoder DALLE (dalle-mini / BART style): a text encoder and an image decoder with cross-attention.

``DALLE(config)`` with ``config.architecture == "encoder_decoder"`` builds this class (a :class:`DALLE` subclass), so
training, checkpoints, generation and evaluation take either architecture through the same API.

- **Encoder**: ``encoder_depth`` pre-LayerNorm layers of bidirectional self-attention over the ``text_seq_len`` text
  positions (learned token + position embeddings; padding is the per-position padding token ``num_text_tokens + i``,
  as in the decoder-only model). A query reads every non-padding key *and itself*: padding keys are masked, but each
  position always sees its own key, so no mask row is empty and the null condition (all padding) is well defined:
  each of its positions then attends to its own, position-distinct padding embedding only.
- **Decoder**: ``depth`` layers over ``[BOS, image_1..image_{N-1}]`` (``N = image_seq_len`` positions) predicting
  ``image_1..image_N``. Each layer is causal self-attention, cross-attention to the encoder output, feed-forward. The
  self-attention reuses :class:`dalle_transformer.masks.AttentionPattern` with a one-position text part (BOS), so
  every attention type, backend and the KV-cached decode step of the decoder-only model apply unchanged.
  Cross-attention reads all ``text_seq_len`` encoder outputs, padding positions included (as the decoder-only image
  tokens read the padding positions): they say where the caption ends, and give the null condition a memory.
- **Losses**: there is no text language-model head, so ``text_loss`` is a zero tensor, ``text_logits`` is empty
  (``[B, 0, num_text_logits]``) and ``loss == image_loss`` (``loss_img_weight`` has no effect).
- **Generation**: the encoder output and every layer's cross-attention keys/values are computed once per prompt (and
  for the null rows of guidance, in the same batch) and kept in :class:`EncoderDecoderCache` beside the decoder's
  self-attention keys/values; ``generate_text_ids`` raises :class:`ConfigError` (there is nothing to sample text
  from).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dalle_core.errors import ConfigError, ShapeError
from dalle_transformer.attention import Attention, PassContext, is_decoding_step
from dalle_transformer.cache import KVCache
from dalle_transformer.config import DALLEConfig
from dalle_transformer.cross_attention import MemoryAttention, ResidualBranch
from dalle_transformer.layers import Block, FeedForward
from dalle_transformer.loss import cross_entropy
from dalle_transformer.masks import AttentionPattern, layer_patterns
from dalle_transformer.model import DALLE, DALLEOutput


class EncoderMemory(NamedTuple):
    """What the decoder needs from one batch of texts: per decoder layer, cross-attention keys and values
    ``[B, H, T, D]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]


class EncoderDecoderCache(KVCache):
    """The decoder's self-attention cache (``image_seq_len`` positions) plus the prompt's :class:`EncoderMemory`,
    set by :meth:`EncoderDecoderDALLE.prefill` (or the sampling loop) once per prompt."""

    memory: EncoderMemory | None = None


class EncoderLayer(nn.Module):
    def __init__(self, config: DALLEConfig, index: int) -> None:
        super().__init__()
        self.attn_branch = ResidualBranch(config, index)
        self.attn = MemoryAttention(config.dim, config.heads, config.dim_head, config.attn_dropout)
        self.ff_branch = ResidualBranch(config, index)
        self.ff = FeedForward(config.dim, config.ff_mult, config.ff_dropout, config.ff_activation)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        def attend(h: torch.Tensor) -> torch.Tensor:
            keys, values = self.attn.project_memory(h)
            return self.attn(h, keys, values, mask)

        x = x + self.attn_branch(x, attend)
        return x + self.ff_branch(x, self.ff)


class DecoderLayer(nn.Module):
    """A decoder-only :class:`Block` (causal self-attention, feed-forward) with a cross-attention branch between."""

    def __init__(self, config: DALLEConfig, index: int) -> None:
        super().__init__()
        self.block = Block(config, index, owns_attn=True, owns_ff=True)
        self.cross_branch = ResidualBranch(config, index)
        self.cross = MemoryAttention(config.dim, config.heads, config.dim_head, config.attn_dropout)

    def forward(
        self,
        x: torch.Tensor,
        pattern: AttentionPattern,
        context: PassContext,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> torch.Tensor:
        block = self.block
        assert block.attn is not None and block.ff is not None  # a decoder layer owns both
        x = x + block.attention_branch(x, attn=block.attn, pattern=pattern, context=context)
        x = x + self.cross_branch(x, lambda h: self.cross(h, keys, values, None))
        return x + block.feed_forward_branch(x, ff=block.ff, context=context)


class EncoderDecoderDALLE(DALLE):
    """See the module docstring. Built by ``DALLE(config)``; inherits input checks, checkpoints and sampling."""

    def __init__(self, config: DALLEConfig) -> None:
        # DALLE.__init__ builds the decoder-only stack; this model builds its own modules instead.
        nn.Module.__init__(self)
        if not isinstance(config, DALLEConfig) or config.architecture != "encoder_decoder":
            raise ConfigError(
                f"EncoderDecoderDALLE: expected a DALLEConfig with architecture 'encoder_decoder', got {config!r}"
            )
        self.config = config
        dim = config.dim
        self.bos = nn.Parameter(torch.zeros(dim))
        self.text_emb = nn.Embedding(config.num_text_logits, dim)
        self.text_pos_emb = nn.Embedding(config.text_seq_len, dim)
        self.image_emb = nn.Embedding(config.num_image_tokens, dim)
        self.image_row_emb = nn.Embedding(config.image_fmap_size, dim)
        self.image_col_emb = nn.Embedding(config.image_fmap_size, dim)
        self.encoder = nn.ModuleList(EncoderLayer(config, i) for i in range(config.num_encoder_layers))
        self.encoder_norm = nn.LayerNorm(dim)
        self.decoder = nn.ModuleList(DecoderLayer(config, i) for i in range(config.depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, config.num_image_tokens)
        # The decoder's sequence is [BOS, image]: the patterns' text part is BOS alone.
        self.patterns = tuple(dataclasses.replace(p, text_len=1) for p in layer_patterns(config))
        self.token_shift = None
        self.attention_backend = "auto"
        self._register_position_buffers()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-style init as the decoder-only model: N(0, 0.02), zero biases, residual outputs scaled down."""
        self._init_weights()
        encoder_std = 0.02 / (2 * self.config.num_encoder_layers) ** 0.5
        for encoder_layer in self.encoder_layers():
            nn.init.normal_(encoder_layer.attn.to_out.weight, std=encoder_std)
            nn.init.normal_(cast(nn.Linear, encoder_layer.ff.net[-1]).weight, std=encoder_std)
        decoder_std = 0.02 / (3 * self.config.depth) ** 0.5  # three residual branches per decoder layer
        for layer in self.decoder_layers():
            assert layer.block.attn is not None and layer.block.ff is not None
            nn.init.normal_(layer.block.attn.to_out.weight, std=decoder_std)
            nn.init.normal_(layer.cross.to_out.weight, std=decoder_std)
            nn.init.normal_(cast(nn.Linear, layer.block.ff.net[-1]).weight, std=decoder_std)

    def encoder_layers(self) -> list[EncoderLayer]:
        return [cast(EncoderLayer, layer) for layer in self.encoder]

    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.decoder]

    def layer_blocks(self) -> list[Block]:
        """The decoder's ``depth`` self-attention / feed-forward blocks."""
        return [layer.block for layer in self.decoder_layers()]

    def _layer_modules(self) -> list[tuple[Attention | None, FeedForward | None]]:
        return [(block.attn, block.ff) for block in self.layer_blocks()]

    # ---------------------------------------------------------------- building blocks

    def _image_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.to_logits.weight, self.to_logits.bias

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        raise ConfigError("architecture 'encoder_decoder' has no text head (it does not model text)")

    def encoder_mask(self, text: torch.Tensor) -> torch.Tensor:
        """``bool[B, 1, T, T]`` for prepared ``text``: query ``i`` reads key ``j`` when ``j`` is not padding or
        ``j == i`` (so an all-padding text still has one key per row)."""
        real = text < self.config.num_text_tokens
        own = torch.eye(text.shape[1], dtype=torch.bool, device=text.device)
        return (real[:, None, :] | own)[:, None]

    def encode(self, text: torch.Tensor) -> torch.Tensor:
        """Encoder output ``[B, T, dim]`` (final LayerNorm applied) for prepared text ids ``[B, T]``."""
        x = self.text_emb(text) + self.text_pos_emb.weight[: text.shape[1]]
        if self.config.stable:
            x = x * 0.1 + x.detach() * 0.9
        mask = self.encoder_mask(text)
        recompute = self.config.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder:
            x = checkpoint(layer, x, mask, use_reentrant=False) if recompute else layer(x, mask)
        return self.encoder_norm(x)

    def encoder_memory(self, text: torch.Tensor) -> EncoderMemory:
        """Encode prepared ``text`` and project every decoder layer's cross-attention keys and values."""
        hidden = self.encode(text)
        pairs = [layer.cross.project_memory(hidden) for layer in self.decoder_layers()]
        return EncoderMemory(tuple(k for k, _ in pairs), tuple(v for _, v in pairs))

    def _decoder_input(self, image: torch.Tensor, start: int) -> torch.Tensor:
        """Decoder inputs at positions ``start..start+n``: position 0 is BOS, position ``p > 0`` image token ``p-1``."""
        if start == 0:
            bos = self.bos.expand(image.shape[0], 1, -1)
            return torch.cat([bos, self._embed_image(image)], dim=1)
        return self._embed_image(image, start=start - 1)

    def _decode(self, x: torch.Tensor, memory: EncoderMemory, cache: KVCache | None = None) -> torch.Tensor:
        """The decoder layers over positions ``start..start+n`` (``start``: what ``cache`` holds), no final norm."""
        config = self.config
        start, n = (cache.length if cache is not None else 0), x.shape[1]
        if start + n > config.image_seq_len:
            raise ShapeError(f"the decoder reads at most {config.image_seq_len} positions, got up to {start + n}")
        if config.stable:
            x = x * 0.1 + x.detach() * 0.9
        single = is_decoding_step(cache, n, self.training)
        self._prepare_decoding(cache, x.shape[0], starting=start == 0, single=single)
        context = PassContext(start, cache, self.attention_backend, None, None, config.stable, single)
        recompute = config.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.decoder_layers()):
            args = (x, self.patterns[i], context, memory.keys[i], memory.values[i])
            x = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        if cache is not None:
            cache.advance(n)
        return x

    # ---------------------------------------------------------------- training

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> DALLEOutput:
        """Teacher-forced image logits and loss; ``text_logits`` is empty and ``text_loss`` zero (no text head).

        ``null_cond_prob`` replaces texts by the null condition in training, as in the decoder-only model.
        """
        text = self.prepare_text(text_ids)
        image = self.check_image_ids(image_ids, batch_size=text.shape[0])
        if self.training and self.config.null_cond_prob > 0:
            dropped = torch.rand(text.shape[0], device=text.device) < self.config.null_cond_prob
            text = torch.where(dropped[:, None], self.null_text(text.shape[0]), text)
        hidden = self._decode(self._decoder_input(image[:, :-1], 0), self.encoder_memory(text))
        image_logits = self._image_logits(hidden)
        image_loss = cross_entropy(image_logits, image)
        text_logits = image_logits.new_zeros(text.shape[0], 0, self.config.num_text_logits)
        return DALLEOutput(text_logits, image_logits, image_loss, image_loss.new_zeros(()), image_loss)

    # ---------------------------------------------------------------- incremental decoding

    def new_cache(self, batch_size: int) -> EncoderDecoderCache:
        """An empty cache: the decoder's ``image_seq_len`` positions; the encoder memory is set by prefill."""
        config = self.config
        return EncoderDecoderCache(
            config.depth,
            batch_size,
            config.heads,
            config.image_seq_len,
            config.dim_head,
            dtype=self.to_logits.weight.dtype,
            device=self.to_logits.weight.device,
        )

    def prefill(self, text_ids: torch.Tensor, cache: KVCache, image_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the text once (kept in ``cache.memory``), write ``[BOS, image_prefix]`` to the empty ``cache``;
        return the logits of the next image token, ``[B, num_image_tokens]``."""
        if not isinstance(cache, EncoderDecoderCache) or cache.length != 0:
            raise ShapeError("prefill expects an empty cache made by this model's new_cache")
        text = self.prepare_text(text_ids)
        prefix = text.new_zeros(text.shape[0], 0)
        if image_prefix is not None:
            prefix = self.check_image_prefix(image_prefix, text.shape[0], "image_prefix")
            if prefix.shape[1] >= self.config.image_seq_len:
                raise ShapeError(
                    f"image_prefix: expected fewer than image_seq_len={self.config.image_seq_len} ids, "
                    f"got {prefix.shape[1]}"
                )
        cache.memory = self.encoder_memory(text)
        return self._image_logits(self._decode(self._decoder_input(prefix, 0), cache.memory, cache)[:, -1], cache)

    def decode_step(self, image_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed image token ``k`` (``int64[B]``) after a prefill and ``k - 1`` steps; logits of token ``k + 1``."""
        memory = cache.memory if isinstance(cache, EncoderDecoderCache) else None
        position = cache.length - 1
        if memory is None or not 0 <= position < self.config.image_seq_len - 1:
            raise ShapeError(
                f"decode_step expects a prefilled cache holding 1 to {self.config.image_seq_len - 1} positions, "
                f"got {cache.length}"
            )
        hidden = self._decode(self._decoder_input(image_ids[:, None], position + 1), memory, cache)
        return self._image_logits(hidden[:, -1], cache)

    def next_image_logits(self, text_ids: torch.Tensor, image_prefix: torch.Tensor) -> torch.Tensor:
        """Without a cache: logits ``[B, num_image_tokens]`` of the image token after ``image_prefix`` ``[B, k]``."""
        memory = self.encoder_memory(self.prepare_text(text_ids))
        return self._image_logits(self._decode(self._decoder_input(image_prefix, 0), memory)[:, -1])

    def _image_stepper(self, text: torch.Tensor, use_cache: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        # The encoder memory is computed here, once per prompt, with or without the self-attention cache.
        memory = self.encoder_memory(text)
        cache = self.new_cache(text.shape[0]) if use_cache else None
        if cache is not None:
            cache.memory = memory

        def step(image_ids: torch.Tensor) -> torch.Tensor:
            if cache is None or cache.length == 0:
                x = self._decoder_input(image_ids, 0)
            else:
                done = cache.length - 1  # image tokens already in the cache
                x = self._decoder_input(image_ids[:, done:], done + 1)
            return self._image_logits(self._decode(x, memory, cache)[:, -1], cache)

        return step

    def generate_text_ids(self, text_ids: torch.Tensor, **options: object) -> torch.Tensor:
        raise ConfigError(
            "generate_text_ids: architecture 'encoder_decoder' has no text head; use a 'decoder_only' model"
        )
