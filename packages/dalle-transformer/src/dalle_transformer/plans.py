"""Index tables that let the efficient and the cached attention paths skip masked work.

Both are derived from :meth:`AttentionPattern.allowed` (never from a second, hand-written rule), once per pattern and
device, and checked on construction: a plan that gathered fewer keys than the mask allows raises.

- :class:`GroupedPlan` (efficient full-sequence path of the non-``full`` types): the image cells are split into
  groups of queries that share candidate keys (a row for ``axial_row``, a column for ``axial_col``, one cell for
  ``conv_like``, one block for ``sparse``). Each group gathers the union of its queries' allowed image keys, so a
  query's scores cover ``text_len`` text keys plus ``M`` gathered keys instead of the whole sequence.
- :func:`kernel_groups` (the same groups for :func:`dalle_transformer.native.causal_attention`): each group's
  queries and exactly the image keys its queries' mask rows allow, without padding, for one sequence length.
- :func:`decode_keys` (KV-cached decode): the key positions one new query may attend to, to gather from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle_transformer.masks import AttentionPattern, cached_table
from dalle_transformer.native import AttentionGroups


@dataclass(frozen=True)
class GroupBucket:
    """Groups gathering the same number ``M`` of keys, over the ``N = fmap**2`` image cells (cell ``N``: a dummy).

    ``query_cells``: ``[G, S]`` cell of each query (``N`` for padding); ``key_cells``: ``[G, M]`` gathered key cells
    (``N`` for padding); ``mask``: ``[G, S, M]`` allowed (query, key) pairs.
    """

    query_cells: torch.Tensor
    key_cells: torch.Tensor
    mask: torch.Tensor


@dataclass(frozen=True)
class GroupedPlan:
    """Buckets of query groups (groups sorted by key count, so little padding is computed), and ``order``: ``[N]``
    the index of each cell among the buckets' concatenated flattened queries, to restore raster order."""

    buckets: tuple[GroupBucket, ...]
    order: torch.Tensor

    @property
    def image_pairs(self) -> int:
        """(query, image key) score entries computed: ``G * S * M`` summed over buckets."""
        return sum(bucket.mask.numel() for bucket in self.buckets)

    @property
    def num_queries(self) -> int:
        """Query rows computed (``G * S`` summed over buckets, padding included)."""
        return sum(bucket.query_cells.numel() for bucket in self.buckets)


GROUP_SIZE = 8  # conv_like queries per group: a row segment shares most of its window (measured best on CPU)
MAX_BUCKETS = 4
# conv_like queries per group of kernel_groups: the native kernels' costs per group (gathers, products only as deep
# as the group is tall) outweigh the keys a longer row segment adds (medium model: 26 ms forward + backward a layer
# in groups of 16, 31 in groups of 8, 34 in groups of 4).
KERNEL_GROUP_SIZE = 16


def _query_groups(pattern: AttentionPattern, conv_group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``[G, S]`` cells per group; the only type-specific part of the efficient path (which queries share keys)."""
    f, n = pattern.fmap_size, pattern.fmap_size**2
    cells = torch.arange(n)
    if pattern.kind == "axial_row":
        return cells.view(f, f)
    if pattern.kind == "axial_col":
        return cells.view(f, f).t().contiguous()
    if pattern.kind == "conv_like":
        size = min(conv_group_size, f)
        segments = -(-f // size)
        rows = F.pad(cells.view(f, f), (0, segments * size - f), value=n)
        return rows.reshape(f * segments, size)
    if pattern.kind == "sparse":
        size = min(pattern.block_size, n)
        blocks = -(-n // size)
        return torch.cat([cells, torch.full((blocks * size - n,), n)]).view(blocks, size)
    raise ValueError(f"attention type {pattern.kind!r} has no grouped plan")


def image_cell_mask(pattern: AttentionPattern) -> torch.Tensor:
    """``bool[N + 1, N + 1]``: may image cell ``i`` attend to image cell ``j`` (row/column ``N``: the dummy, never)."""
    n = pattern.fmap_size**2
    positions = pattern.text_len + torch.arange(n)
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:n, :n] = pattern.allowed(positions[:, None], positions[None, :])
    return mask


def _bucket(cell_mask: torch.Tensor, queries: torch.Tensor, wanted: torch.Tensor) -> GroupBucket:
    n = cell_mask.shape[0] - 1
    width = max(int(wanted.sum(dim=1).max()), 1)
    # Allowed keys first, in cell order; the rest of each row is the dummy cell.
    rank = torch.where(wanted, torch.arange(n + 1), n + 1 + torch.arange(n + 1))
    keys = rank.sort(dim=1).values[:, :width]
    keys = torch.where(keys > n, n, keys)
    mask = cell_mask[queries[:, :, None], keys[:, None, :]]
    if not torch.equal(mask.sum(dim=2), cell_mask[queries].sum(dim=2)):
        raise RuntimeError("the grouped plan lost keys that the mask allows")
    return GroupBucket(queries, keys, mask)


def _check_text_keys(pattern: AttentionPattern) -> None:
    text = torch.arange(pattern.text_len)
    image_positions = pattern.text_len + torch.arange(pattern.fmap_size**2)
    if not bool(pattern.allowed(image_positions[:, None], text[None, :]).all()):
        raise RuntimeError(f"{pattern.kind}: the grouped plans assume image queries see every text key")


@cached_table
def grouped_plan(pattern: AttentionPattern, device: torch.device) -> GroupedPlan:
    n = pattern.fmap_size**2
    _check_text_keys(pattern)
    cell_mask = image_cell_mask(pattern)
    queries = _query_groups(pattern)
    wanted = cell_mask[queries].any(dim=1)  # [G, N + 1]: keys any query of the group may attend to
    # Groups sorted by how many keys they gather, cut into buckets of equal group count: each bucket pads its key
    # lists only to its own longest one.
    by_count = wanted.sum(dim=1).argsort(stable=True)
    chunks = by_count.tensor_split(min(MAX_BUCKETS, len(by_count)))
    buckets = tuple(_bucket(cell_mask, queries[chunk], wanted[chunk]) for chunk in chunks if len(chunk))
    flat = torch.cat([bucket.query_cells.flatten() for bucket in buckets])
    order = torch.empty(n, dtype=torch.long)
    valid = flat < n
    order[flat[valid]] = torch.arange(flat.numel())[valid]
    moved = tuple(GroupBucket(b.query_cells.to(device), b.key_cells.to(device), b.mask.to(device)) for b in buckets)
    return GroupedPlan(moved, order.to(device))


@cached_table
def kernel_groups(pattern: AttentionPattern, length: int) -> AttentionGroups:
    """The image queries of the first ``length`` positions (``text_len < length <= max_len + 1``) in the groups of
    :func:`_query_groups`, each with the union of its queries' allowed image keys, as CPU tensors."""
    text_len, cells = pattern.text_len, length - pattern.text_len
    if not 0 < cells <= pattern.fmap_size**2:
        raise ValueError(f"{pattern.kind}: expected a sequence of {text_len + 1}..{pattern.max_len + 1} positions, "
                         f"got {length}")  # fmt: skip
    _check_text_keys(pattern)
    cell_mask = image_cell_mask(pattern)[:cells, :cells]
    query_lists, key_lists, masks = [], [], []
    for group in _query_groups(pattern, KERNEL_GROUP_SIZE):
        queries = group[group < cells]
        if len(queries) == 0:
            continue
        rows = cell_mask[queries]
        keys = rows.any(dim=0).nonzero().flatten()
        query_lists.append(queries)
        key_lists.append(keys)
        masks.append(rows[:, keys].flatten())
    queries = torch.cat(query_lists)
    if not torch.equal(queries.sort().values, torch.arange(cells)):
        raise RuntimeError(f"{pattern.kind}: the kernel's groups do not hold every image query once")

    def starts(parts: list[torch.Tensor]) -> torch.Tensor:
        return F.pad(torch.tensor([len(part) for part in parts]).cumsum(0), (1, 0))

    return AttentionGroups(
        length=length,
        text_len=text_len,
        query_start=starts(query_lists),
        queries=queries + text_len,
        key_start=starts(key_lists),
        keys=torch.cat(key_lists) + text_len,
        mask_start=starts(masks),
        allowed=torch.cat(masks).to(torch.uint8),
        max_queries=max(len(part) for part in query_lists),
        max_keys=max(len(part) for part in key_lists),
    )


@cached_table
def _decode_table(pattern: AttentionPattern, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    rows = pattern.square_mask(pattern.max_len)
    table: list[torch.Tensor | None] = []
    for position in range(pattern.max_len):
        row = rows[position, : position + 1]
        # None: every earlier position (a contiguous slice of the cache, nothing to gather).
        table.append(None if bool(row.all()) else row.nonzero().flatten().to(device))
    return tuple(table)


def decode_keys(pattern: AttentionPattern, position: int, device: torch.device) -> torch.Tensor | None:
    """Key positions the query at ``position`` may attend to, or None when that is all of ``0..position``."""
    if pattern.kind == "full" or position < pattern.text_len:
        return None
    return _decode_table(pattern, torch.device(device))[position]
