"""How much attention work each path executes, counted as (query, key) score pairs per batch row and head.

The counts come from the same masks and index tables the kernels run on, so benchmarks can report executed work
against the dense baseline. Multiply by ``4 * dim_head`` for the FLOPs of ``QK^T`` and ``PV`` per pair, and by
``batch * heads`` for a batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle_transformer.config import DALLEConfig
from dalle_transformer.kernels import causal_pairs, dense_pairs, tile_pairs
from dalle_transformer.masks import AttentionPattern, layer_patterns
from dalle_transformer.plans import decode_keys, kernel_groups


@dataclass(frozen=True)
class AttentionWork:
    """Pairs per path for one pass, summed over layers.

    ``allowed``: pairs the masks allow (what any exact method needs); ``dense``: the masked-SDPA reference, every
    pair of the sequence; ``efficient``: the CPU path as executed (causal attention counted as the causal half,
    which its kernels skip; the other types as the native kernels' groups compute them, each image query against
    every text key and every key gathered for its group, :attr:`dalle_transformer.native.AttentionGroups.pairs`;
    PyTorch's grouped path, where those kernels do not run, pads its buckets' key lists, 1-6% more); ``flex``:
    pairs in the FlexAttention blocks (128 x 128) that hold any allowed pair.
    """

    allowed: int
    dense: int
    efficient: int
    flex: int


def pattern_work(pattern: AttentionPattern, length: int, flex_block: int = 128) -> AttentionWork:
    """One layer's work over the first ``length`` positions, without a cache."""
    mask = pattern.square_mask(length)
    text_len = pattern.text_len
    if pattern.kind == "full" or length <= text_len:
        efficient = causal_pairs(length)
    else:
        efficient = kernel_groups(pattern, length).pairs
    return AttentionWork(int(mask.sum()), dense_pairs(length), efficient, tile_pairs(mask, flex_block))


def forward_attention_work(config: DALLEConfig, length: int | None = None) -> AttentionWork:
    """All layers' work for one training forward (``length``: default ``total_seq_len``, the training input)."""
    length = config.total_seq_len if length is None else length
    works = [pattern_work(pattern, length) for pattern in layer_patterns(config)]
    fields = ("allowed", "dense", "efficient", "flex")
    return AttentionWork(*(sum(getattr(work, field) for work in works) for field in fields))


@dataclass(frozen=True)
class DecodeWork:
    """Pairs of the KV-cached decode steps of one image (after the prefill), summed over layers.

    ``gathered``: what :func:`dalle_transformer.kernels.attend_decode` computes (only the keys each mask row allows);
    ``full_rows``: what attending to every cached position would compute (DALLE-pytorch's cached path).
    """

    gathered: int
    full_rows: int


def decode_attention_work(config: DALLEConfig, num_init_img_tokens: int = 0) -> DecodeWork:
    first = config.text_seq_len + 1 + num_init_img_tokens  # the first position fed by a decode step
    gathered = full = 0
    for pattern in layer_patterns(config):
        for position in range(first, config.total_seq_len):
            keys = decode_keys(pattern, position, torch.device("cpu"))
            gathered += position + 1 if keys is None else keys.numel()
            full += position + 1
    return DecodeWork(gathered, full)
