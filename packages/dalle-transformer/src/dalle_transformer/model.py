"""The DALLE transformer: a decoder-only model over ``[BOS, text ids, image ids]``.

Layout (as in DALLE-pytorch): the transformer reads ``[BOS, text_1..text_T, image_1..image_{N-1}]`` (``T + N``
positions) and predicts ``text_1..text_T, image_1..image_N``. Each text position holding ``text_pad_id`` is replaced by
its own padding token ``num_text_tokens + i``, so the model can tell padding positions apart; those are also the text
targets there. Only the logits a position can use are computed: text positions use the text rows of ``to_logits``,
image positions the image rows.

With ``architecture="encoder_decoder"``, ``DALLE(config)`` builds
:class:`dalle_transformer.encoder_decoder.EncoderDecoderDALLE` instead (same public API).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from dalle_core.checkpoint import CONFIG_FILE, atomic_directory, load_weights, read_json, save_weights
from dalle_core.config import from_dict, to_dict
from dalle_core.errors import CheckpointError, ConfigError, ShapeError
from dalle_transformer import generation
from dalle_transformer.attention import ATTENTION_BACKENDS, Attention, PassContext, is_decoding_step
from dalle_transformer.cache import KVCache
from dalle_transformer.config import DALLEConfig
from dalle_transformer.decoding_weights import ProjectionCopies, project
from dalle_transformer.inputs import check_image_ids, check_image_prefix, check_text_ids
from dalle_transformer.layers import Block, FeedForward, decoding_weights, run_sequential
from dalle_transformer.linear import linear, partitioned_linear
from dalle_transformer.loss import cross_entropy
from dalle_transformer.masks import layer_patterns
from dalle_transformer.reversible import run_reversible
from dalle_transformer.rotary import rotary_angles
from dalle_transformer.shift import TokenShift
from dalle_transformer.static_decode import StaticDecoder

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


def _owners(ids: tuple[int, ...]) -> tuple[int, ...]:
    """For each layer, the first layer with the same sharing id (the one that holds the weights)."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(share_id, index) for index, share_id in enumerate(ids))


class DALLE(nn.Module):
    """Autoregressive transformer over text and image token ids (never over text or images themselves)."""

    # How KV-cached image decoding runs its steps (dalle_transformer.static_decode; the encoder-decoder architecture
    # always runs them eagerly). On CUDA each step is replayed from one captured CUDA graph unless this is False.
    cuda_graph_decoding: bool = True
    # torch.compile the decoding step (once per batch size and process: tens of seconds on a CPU, cached on disk by
    # inductor), fusing its small operations. On AVX-512 CPUs the eager steps read oneDNN-packed weight copies, which
    # a compiled step cannot take: on the 2-core CPU of docs/benchmarks.md a small model's eager steps are as fast as
    # compiled ones and a medium model's 1.1x faster.
    compile_decoding: bool = False
    # On the CPU, decoding reads the projections from copies made per sequence in the layout its few-row products are
    # fastest with (dalle_transformer.linear.few_row_copy): on AVX-512 CPUs every weight in oneDNN's blocked layout
    # (a medium model generating 1.12x faster, 1.40x with guidance, for a second copy of the layers' weights while a
    # KV cache lives), elsewhere weights of more than 1024 input columns in column blocks (1.19x, a third more
    # memory). False reads every weight as stored.
    decoding_weight_copies: bool = True

    # Buffers (registered in __init__), declared for type checkers.
    text_pad_ids: torch.Tensor
    image_rows: torch.Tensor
    image_cols: torch.Tensor
    rotary_cos: torch.Tensor
    rotary_sin: torch.Tensor

    def __new__(cls, *args: Any, **kwargs: Any) -> DALLE:
        # One constructor for both architectures: DALLE(config) with architecture "encoder_decoder" builds the
        # subclass, so callers (training, checkpoints, generation, evaluation) need no special case. No arguments:
        # copy.deepcopy / pickle recreating an instance of its own class.
        config = args[0] if args else kwargs.get("config")
        if cls is DALLE and isinstance(config, DALLEConfig) and config.architecture == "encoder_decoder":
            from dalle_transformer.encoder_decoder import EncoderDecoderDALLE

            return super().__new__(EncoderDecoderDALLE)
        return super().__new__(cls)

    def __init__(self, config: DALLEConfig) -> None:
        super().__init__()
        if not isinstance(config, DALLEConfig):
            raise ConfigError(f"DALLE: expected a DALLEConfig, got {type(config).__name__}")
        self.config = config
        dim = config.dim
        self.bos = nn.Parameter(torch.zeros(dim))
        # With share_input_output_emb the embeddings are rows of to_logits; with rotary_emb there are no learned
        # positions (DALLE-pytorch's choices).
        if not config.share_input_output_emb:
            self.text_emb = nn.Embedding(config.num_text_logits, dim)
        if not config.rotary_emb:
            self.text_pos_emb = nn.Embedding(config.text_seq_len, dim)
        if not config.share_input_output_emb:
            self.image_emb = nn.Embedding(config.num_image_tokens, dim)
        if not config.rotary_emb:
            self.image_row_emb = nn.Embedding(config.image_fmap_size, dim)
            self.image_col_emb = nn.Embedding(config.image_fmap_size, dim)
        self.attn_owner = _owners(config.layer_share_ids(config.shared_attn_ids))
        self.ff_owner = _owners(config.layer_share_ids(config.shared_ff_ids))
        self.blocks = nn.ModuleList(
            Block(config, i, owns_attn=self.attn_owner[i] == i, owns_ff=self.ff_owner[i] == i)
            for i in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, config.num_text_logits + config.num_image_tokens)

        self.patterns = layer_patterns(config)
        self.token_shift = TokenShift(config) if config.shift_tokens else None
        self.attention_backend = "auto"
        self._register_position_buffers()
        if config.rotary_emb:
            angles = rotary_angles(config.text_seq_len, config.image_fmap_size, config.dim_head)
            self.register_buffer("rotary_cos", angles.cos(), persistent=False)
            self.register_buffer("rotary_sin", angles.sin(), persistent=False)
        self.reset_parameters()

    def _register_position_buffers(self) -> None:
        """Image row/column of each image position and each text position's padding id (derived, not saved)."""
        config = self.config
        positions = torch.arange(config.image_seq_len)
        self.register_buffer("image_rows", positions // config.image_fmap_size, persistent=False)
        self.register_buffer("image_cols", positions % config.image_fmap_size, persistent=False)
        pad_ids = config.num_text_tokens + torch.arange(config.text_seq_len)
        self.register_buffer("text_pad_ids", pad_ids, persistent=False)

    def _init_weights(self) -> None:
        """N(0, 0.02) for every linear and embedding weight and BOS, zero biases (before residual scaling)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.bos, std=0.02)

    def reset_parameters(self) -> None:
        """GPT-style init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 * depth)."""
        self._init_weights()
        residual_std = 0.02 / (2 * self.config.depth) ** 0.5
        for block in self.layer_blocks():
            if block.attn is not None:
                nn.init.normal_(block.attn.to_out.weight, std=residual_std)
            if block.ff is not None:
                nn.init.normal_(cast(nn.Linear, block.ff.net[-1]).weight, std=residual_std)

    def layer_blocks(self) -> list[Block]:
        """The ``depth`` blocks (norms and scales per layer; attention / feed-forward where the layer owns them)."""
        return [block for block in self.blocks if isinstance(block, Block)]

    def set_attention_backend(self, backend: str) -> None:
        """How whole sequences are attended (all give the same numbers; only the work differs):

        ``auto`` (default): ``full`` layers on SDPA with ``is_causal``, the other types on FlexAttention on CUDA and
        on the efficient gathered path elsewhere; ``efficient``; ``flex`` (FlexAttention; the efficient path runs
        where it cannot: with attention dropout in training, or gradients on CPU); ``dense`` (masked SDPA, the
        reference). The KV-cached decode step always gathers just the keys each query's mask row allows, and on the
        ``auto`` backend attends to them in :mod:`dalle_transformer.native`'s C kernel on a CPU where it is built.
        """
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention backend: expected one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
        self.attention_backend = backend

    # ---------------------------------------------------------------- input checks

    def prepare_text(self, text_ids: torch.Tensor) -> torch.Tensor:
        """Validate ``int[B, <=T]`` text ids; return ``int64[B, T]`` padded, with padding as per-position ids.

        The result holds ids in ``[0, num_text_tokens + text_seq_len)``: the model's text inputs and text targets.
        """
        config = self.config
        check_text_ids(config, text_ids)
        text = text_ids.to(device=self.text_pad_ids.device, dtype=torch.long)
        if text.shape[1] < config.text_seq_len:
            text = F.pad(text, (0, config.text_seq_len - text.shape[1]), value=config.text_pad_id)
        return torch.where(text == config.text_pad_id, self.text_pad_ids, text)

    def null_text(self, batch_size: int) -> torch.Tensor:
        """The null condition (an all-padding text) as prepared ids ``int64[batch_size, T]``."""
        return self.text_pad_ids.expand(batch_size, -1)

    def check_image_ids(self, image_ids: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Validate ``int[B, image_seq_len]`` image ids; return them as int64 on the model's device."""
        check_image_ids(self.config, image_ids, batch_size)
        return image_ids.to(device=self.text_pad_ids.device, dtype=torch.long)

    def check_image_prefix(self, image_ids: torch.Tensor, batch_size: int, what: str = "image ids") -> torch.Tensor:
        """Validate ``int[batch_size, k <= image_seq_len]`` leading image ids; return them as int64 on the device."""
        check_image_prefix(self.config, image_ids, batch_size, what)
        return image_ids.to(device=self.text_pad_ids.device, dtype=torch.long)

    # ---------------------------------------------------------------- building blocks

    def _text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        if self.config.share_input_output_emb:
            return F.embedding(text, self.to_logits.weight[: self.config.num_text_logits])
        return self.text_emb(text)

    def _image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        if self.config.share_input_output_emb:
            return F.embedding(image, self.to_logits.weight[self.config.num_text_logits :])
        return self.image_emb(image)

    def _embed_text(self, text: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings of prepared text ids occupying text positions ``start..start+n`` (without BOS)."""
        tokens = self._text_tokens(text)
        if self.config.rotary_emb:
            return tokens
        return tokens + self.text_pos_emb.weight[start : start + text.shape[1]]

    def _embed_prefix(self, text: torch.Tensor) -> torch.Tensor:
        """``[BOS, text_1..text_k]`` embeddings ``[B, k + 1, dim]`` from prepared text ids (``k <= T``)."""
        bos = self.bos.expand(text.shape[0], 1, -1)
        return torch.cat([bos, self._embed_text(text)], dim=1)

    def _embed_image_at(self, image: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``[B, 1, dim]`` embeddings of one image id per row (``int64[B]``) at image position ``position``
        (``int64[1]`` on the device; see :meth:`_decode_step_at`)."""
        tokens = self._image_tokens(image[:, None])
        if self.config.rotary_emb:
            return tokens
        rows, cols = self.image_rows.index_select(0, position), self.image_cols.index_select(0, position)
        return tokens + self.image_row_emb(rows) + self.image_col_emb(cols)

    def _embed_image(self, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings of image ids occupying image positions ``start..start+n`` (row + column axial positions)."""
        tokens = self._image_tokens(image)
        if self.config.rotary_emb:
            return tokens
        end = start + image.shape[1]
        return tokens + self.image_row_emb(self.image_rows[start:end]) + self.image_col_emb(self.image_cols[start:end])

    def _transform(
        self, x: torch.Tensor, cache: KVCache | None = None, position: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layers over positions ``start..start+n`` (``start`` = what ``cache`` holds), without the final norm
        (applied by the heads to the positions they need).

        ``position`` (``int64[1]`` on the device, for a decoding step only) makes the layers take every index from it
        instead of from ``start`` (which it neither checks nor advances), so one compiled step or captured CUDA graph
        serves every position.
        """
        config = self.config
        if position is None:
            start, n = (cache.length if cache is not None else 0), x.shape[1]
            if start + n > config.total_seq_len:
                raise ShapeError(
                    f"the transformer reads at most {config.total_seq_len} positions, got up to {start + n}"
                )
            single = is_decoding_step(cache, n, self.training)
            self._prepare_decoding(cache, x.shape[0], starting=start == 0, single=single)
        else:
            # A decoding step checked by its caller: reading cache.length here would make torch.compile specialise
            # the step on it (one compile per position).
            start, single = 0, True
            self._prepare_decoding(cache, x.shape[0], starting=False, single=True)
        if config.stable:
            # DALLE-pytorch's stable: the embeddings' gradient is scaled by 0.1, their value kept.
            x = x * 0.1 + x.detach() * 0.9
        rotary = None
        if config.rotary_emb and position is not None:
            rotary = (self.rotary_cos.index_select(0, position), self.rotary_sin.index_select(0, position))
        elif config.rotary_emb:
            rotary = (self.rotary_cos[start : start + n], self.rotary_sin[start : start + n])
        context = PassContext(
            start, cache, self.attention_backend, rotary, self.token_shift, config.stable, single, position
        )
        blocks = cast(list[Block], list(self.blocks))  # a list: ModuleList indexing is slow next to a decoding step
        if single and not config.reversible:
            h = x.reshape(x.shape[0], -1)  # one position per row: [B, dim] through the layers
            for block, (attn, ff), pattern in zip(blocks, self._layer_modules(), self.patterns, strict=True):
                assert attn is not None and ff is not None  # owners hold their modules by construction
                h = block.decoding_step(h, attn, ff, pattern, context)
            x = h.view(x.shape)
        else:
            branches = [self._branches(blocks, i, context) for i in range(config.depth)]
            if config.reversible:
                x = run_reversible(branches, x, list(self.blocks.parameters()))
            else:
                recompute = (
                    config.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
                )
                x = run_sequential(branches, x, recompute)
        if cache is not None and position is None:
            cache.advance(n)
        return x

    def _branches(
        self, blocks: Sequence[Block], index: int, context: PassContext
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        block = blocks[index]
        attn = blocks[self.attn_owner[index]].attn
        ff = blocks[self.ff_owner[index]].ff
        assert attn is not None and ff is not None  # owners hold their modules by construction
        return (
            functools.partial(block.attention_branch, attn=attn, pattern=self.patterns[index], context=context),
            functools.partial(block.feed_forward_branch, ff=ff, context=context),
        )

    def _layer_modules(self) -> list[tuple[Attention | None, FeedForward | None]]:
        """Each layer's attention and feed-forward modules, its own or its owner's."""
        blocks = cast(list[Block], list(self.blocks))
        owners = zip(self.attn_owner, self.ff_owner, strict=True)
        return [(blocks[attn].attn, blocks[ff].ff) for attn, ff in owners]

    def _prepare_decoding(self, cache: KVCache | None, rows: int, *, starting: bool, single: bool) -> None:
        """At the first pass over an empty ``cache`` (``starting``) without autograd, a sequence starting to decode,
        gather the layers' tensors for its decoding steps into ``cache.layer_weights``, with few-row copies of the
        current projection weights (none with ``decoding_weight_copies`` off; not in oneDNN's opaque layout for a
        compiled step). A decoding step (``single``) on a cache filled otherwise (with autograd on) gathers them
        without copies."""
        if cache is None or not (single or (starting and not torch.is_grad_enabled())):
            return
        if starting or cache.layer_weights is None:
            copies = self.decoding_weight_copies and starting
            projection = ProjectionCopies(rows, packed=not self.compile_decoding, copies=copies)
            cache.layer_weights = decoding_weights(self.layer_blocks(), self._layer_modules(), projection)
            cache.image_head = projection.of(*self._image_head())

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.stable:
            # DALLE-pytorch's DivideMax: divide by the (signed) per-position maximum, as a constant.
            hidden = hidden / hidden.amax(dim=-1, keepdim=True).detach()
        return self.norm(hidden)

    def _text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        n = self.config.num_text_logits
        return linear(self._final_norm(hidden), self.to_logits.weight[:n], self.to_logits.bias[:n])

    def _image_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias of the image logits: the image rows of ``to_logits``."""
        n = self.config.num_text_logits
        return self.to_logits.weight[n:], self.to_logits.bias[n:]

    def _image_logits(self, hidden: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Image logits of ``hidden``; with ``cache``, through its ``image_head`` (made with the decoding weights)."""
        if cache is not None and cache.image_head is not None:
            return project(cache.image_head, self._final_norm(hidden))
        return linear(self._final_norm(hidden), *self._image_head())

    def _sequence_logits(self, hidden: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text logits of positions ``:text_len`` and image logits of the rest, from the text and image rows of the
        logits layer (:func:`partitioned_linear`: its backward writes the weight's gradient once)."""
        normed = self._final_norm(hidden)
        logits = self.to_logits
        return partitioned_linear(normed, text_len, logits.weight, logits.bias, self.config.num_text_logits)

    # ---------------------------------------------------------------- training

    def forward(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> DALLEOutput:
        """Teacher-forced logits for every text and image position, and the losses they give.

        ``text_ids``: ``int[B, <= text_seq_len]`` in ``[0, num_text_tokens)`` (shorter rows are padded);
        ``image_ids``: ``int[B, image_seq_len]`` in ``[0, num_image_tokens)``. In training mode with
        ``null_cond_prob > 0``, each row's text is replaced by the null condition (all padding, inputs and text
        targets, as in DALLE-pytorch) with that probability, drawn from torch's global RNG.
        """
        text = self.prepare_text(text_ids)
        image = self.check_image_ids(image_ids, batch_size=text.shape[0])
        if self.training and self.config.null_cond_prob > 0:
            dropped = torch.rand(text.shape[0], device=text.device) < self.config.null_cond_prob
            text = torch.where(dropped[:, None], self.null_text(text.shape[0]), text)
        x = torch.cat([self._embed_prefix(text), self._embed_image(image[:, :-1])], dim=1)
        hidden = self._transform(x)
        t = self.config.text_seq_len
        text_logits, image_logits = self._sequence_logits(hidden, t)
        # DALLE-pytorch's (text_loss + w * image_loss) / (w + 1), as a sum of weighted terms: each mean then receives
        # its weight as its gradient, which its kernel has applied already.
        weight = self.config.loss_img_weight
        text_weight, image_weight = 1 / (weight + 1), weight / (weight + 1)
        text_loss = cross_entropy(text_logits, text, gradient_weight=text_weight)
        image_loss = cross_entropy(image_logits, image, gradient_weight=image_weight)
        loss = text_loss * text_weight + image_loss * image_weight
        return DALLEOutput(text_logits, image_logits, loss, text_loss, image_loss)

    def loss(self, text_ids: torch.Tensor, image_ids: torch.Tensor) -> DALLELoss:
        """Cross-entropy means over text and image targets, combined with ``loss_img_weight``.

        Goes through ``__call__``, so module hooks (and a DDP wrapper) apply.
        """
        output = self(text_ids, image_ids)
        return DALLELoss(output.loss, output.text_loss, output.image_loss)

    # ---------------------------------------------------------------- incremental decoding

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty cache for ``batch_size`` sequences of ``total_seq_len`` positions (keys, values and, with
        ``shift_tokens``, the shift inputs)."""
        config = self.config
        return KVCache(
            config.depth,
            batch_size,
            config.heads,
            config.total_seq_len,
            config.dim_head,
            shift_width=self.token_shift.width if self.token_shift is not None else 0,
            dtype=self.to_logits.weight.dtype,
            device=self.to_logits.weight.device,
        )

    def prefill(self, text_ids: torch.Tensor, cache: KVCache, image_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Write ``[BOS, text, image_prefix]`` (``image_prefix``: ``int[B, k]``, ``k < image_seq_len``, optional) to an
        empty ``cache``; return the logits of image token ``k + 1``, ``[B, num_image_tokens]``."""
        if cache.length != 0:
            raise ShapeError(f"prefill expects an empty KV cache, got one holding {cache.length} positions")
        text = self.prepare_text(text_ids)
        x = self._embed_prefix(text)
        if image_prefix is not None:
            prefix = self.check_image_prefix(image_prefix, text.shape[0], "image_prefix")
            if prefix.shape[1] >= self.config.image_seq_len:
                raise ShapeError(
                    f"image_prefix: expected fewer than image_seq_len={self.config.image_seq_len} ids, "
                    f"got {prefix.shape[1]}"
                )
            x = torch.cat([x, self._embed_image(prefix)], dim=1)
        return self._image_logits(self._transform(x, cache)[:, -1], cache)

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
        return self._image_logits(hidden[:, -1], cache)

    def _decode_step_at(self, image_ids: torch.Tensor, image_position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """:meth:`decode_step` with the image position as an ``int64[1]`` device tensor: the same logits, from
        buffers of the same shapes at every position (one ``torch.compile`` build or CUDA graph serves a whole
        generation: :class:`dalle_transformer.static_decode.StaticDecoder`).

        It neither reads nor advances ``cache.length``: the caller checks that the cache holds every position before
        ``image_position`` and counts the new one.
        """
        sequence_position = image_position + (self.config.text_seq_len + 1)
        hidden = self._transform(self._embed_image_at(image_ids, image_position), cache, sequence_position)
        return self._image_logits(hidden[:, -1], cache)

    def next_image_logits(self, text_ids: torch.Tensor, image_prefix: torch.Tensor) -> torch.Tensor:
        """Without a cache: logits ``[B, num_image_tokens]`` of the image token after ``image_prefix`` (``[B, k]``,
        ``k < image_seq_len``), computing the last position's logits only."""
        prefix = self._embed_prefix(self.prepare_text(text_ids))
        hidden = self._transform(torch.cat([prefix, self._embed_image(image_prefix)], dim=1))
        return self._image_logits(hidden[:, -1])

    def _static_decoder(self, cache: KVCache | None) -> StaticDecoder | None:
        """How this model's KV-cached steps run now: None for eagerly."""
        if cache is None or self.training:
            return None
        cuda_graph = self.cuda_graph_decoding and cache.device.type == "cuda"
        if not (cuda_graph or self.compile_decoding):
            return None
        return StaticDecoder(self, cache, compile_step=self.compile_decoding, cuda_graph=cuda_graph)

    def _image_stepper(self, text: torch.Tensor, use_cache: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """For prepared ``text`` rows: a function from the image ids so far (``[B, k]``, one more per call, the first
        call with any ``k``) to the next image token's logits ``[B, num_image_tokens]``; with ``use_cache`` it feeds
        the model only the tokens not yet in its KV cache."""
        text_part = self._embed_prefix(text)
        cache = self.new_cache(text.shape[0]) if use_cache else None
        static = self._static_decoder(cache)

        def step(image_ids: torch.Tensor) -> torch.Tensor:
            if cache is None or cache.length == 0:
                x = torch.cat([text_part, self._embed_image(image_ids)], dim=1)
            else:
                done = cache.length - (self.config.text_seq_len + 1)  # image tokens already in the cache
                if static is not None and image_ids.shape[1] == done + 1:
                    return static(image_ids[:, done], done)
                x = self._embed_image(image_ids[:, done:], start=done)
            return self._image_logits(self._transform(x, cache)[:, -1], cache)

        return step

    # ---------------------------------------------------------------- generation

    def generate_image_ids(
        self,
        text_ids: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_k_fraction: float | None = None,
        top_p: float | None = None,
        cond_scale: float = 1.0,
        generator: torch.Generator | None = None,
        row_generators: Sequence[torch.Generator] | None = None,
        use_cache: bool = True,
        init_image_ids: torch.Tensor | None = None,
        num_init_img_tokens: int | None = None,
        callback: generation.PreviewCallback | None = None,
        callback_every: int = 1,
    ) -> torch.Tensor:
        """Sample ``int64[B, image_seq_len]`` image ids for ``text_ids`` (``int[B, <= text_seq_len]``).

        See :func:`dalle_transformer.generation.generate_image_ids`: top-k as a count or a fraction of the image
        vocabulary, top-p, temperature, classifier-free guidance (``cond_scale``), priming with the first
        ``num_init_img_tokens`` of ``init_image_ids``, a preview ``callback(step, ids)``, and ``row_generators`` (one
        generator per row, so each row's ids do not depend on the rest of the batch).
        """
        return generation.generate_image_ids(
            self,
            text_ids,
            temperature=temperature,
            top_k=top_k,
            top_k_fraction=top_k_fraction,
            top_p=top_p,
            cond_scale=cond_scale,
            generator=generator,
            row_generators=row_generators,
            use_cache=use_cache,
            init_image_ids=init_image_ids,
            num_init_img_tokens=num_init_img_tokens,
            callback=callback,
            callback_every=callback_every,
        )

    def generate_text_ids(
        self,
        text_ids: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Complete text prefixes (``int[B, k]``) into ``int64[B, text_seq_len]`` text ids, stopping each row at
        padding; see :func:`dalle_transformer.generation.generate_text_ids`."""
        return generation.generate_text_ids(
            self, text_ids, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache
        )

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
