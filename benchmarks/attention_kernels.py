"""Whole-sequence attention on the CPU, forward and forward + backward: PyTorch's operators against the native
kernels of ``dalle_transformer.native``, which the ``auto`` backend trains with on AVX-512 CPUs. ``full``: SDPA with
``is_causal`` against the causal kernels; the other types: the ``efficient`` backend's grouped path (gathers and
batched products) against the kernels' groups.

    python benchmarks/attention_kernels.py   # prints a Markdown table (``uvx nox -s bench_attention``)

Shapes of the benchmark configs' training steps (batch 8) and a longer sequence, without and with dropout. Medians
of repeated runs, PyTorch then the kernels in one process; the kernels' forward + backward GFLOP/s count the score
pairs they compute (the causal half, or ``AttentionGroups.pairs``; 2 products forward, 5 backward, 2 d FLOPs each
per pair and head).
"""

from __future__ import annotations

import sys

import torch
from timing import machine, median_seconds

from dalle_transformer import kernels, native
from dalle_transformer.masks import AttentionPattern
from dalle_transformer.plans import kernel_groups

ATTENTION_KINDS = ("axial_row", "axial_col", "conv_like", "sparse")
S_TEXT, M_TEXT = 33, 65  # the benchmark configs' text parts (text_seq_len + 1), before 8x8 and 16x16 images
# (label, pattern, batch, heads, dim_head, dropout); the sequence: the pattern's training input
CASES = [
    ("S", AttentionPattern("full", S_TEXT, 8), 8, 8, 32, 0.0),
    ("M", AttentionPattern("full", M_TEXT, 16), 8, 8, 64, 0.0),
    ("M, dropout 0.1", AttentionPattern("full", M_TEXT, 16), 8, 8, 64, 0.1),
    ("32x32 image, text 256", AttentionPattern("full", 257, 32), 2, 8, 64, 0.0),
    *((f"M {kind}", AttentionPattern(kind, M_TEXT, 16), 8, 8, 64, 0.0) for kind in ATTENTION_KINDS),
    ("32x32 image, text 256, axial_row", AttentionPattern("axial_row", 257, 32), 2, 8, 64, 0.0),
]


def pairs(pattern: AttentionPattern) -> int:
    """Score pairs the kernels compute per batch row and head over the pattern's training input."""
    n = pattern.max_len
    return kernels.causal_pairs(n) if pattern.kind == "full" else kernel_groups(pattern, n).pairs


def timings(
    pattern: AttentionPattern, batch: int, heads: int, dim: int, dropout: float, use_kernels: bool
) -> tuple[float, float]:
    """Median seconds of a forward (no autograd) and of a forward + backward."""
    n = pattern.max_len
    qkv = torch.randn(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)  # the attention layer's layout
    grad = torch.randn(batch, heads, n, dim)
    leaf = qkv.detach().requires_grad_()

    def attend(x: torch.Tensor) -> torch.Tensor:
        out = None
        if use_kernels:
            full = pattern.kind == "full"
            out = kernels.attend_causal(x, dropout) if full else kernels.attend_grouped(x, pattern, dropout)
        if out is None:
            out = kernels.attend_efficient(*x.unbind(0), pattern, dropout)
        return out

    def forward() -> None:
        with torch.no_grad():
            attend(qkv)

    def forward_backward() -> None:
        attend(leaf).backward(grad)

    return median_seconds(forward, repeats=9, warmup=2), median_seconds(forward_backward, repeats=9, warmup=2)


def main() -> None:
    library = native.default_library()
    if library is None or not native.wide_kernels_run(library):
        reason = native.unavailable_reason() or "this CPU is not x86-64-v4 (AVX-512)"
        sys.exit(f"the native causal attention does not run here: {reason}")
    facts = machine()
    print(f"Machine: `{facts['platform']}`, {facts['threads']} threads, torch {facts['torch']}, {facts['date']}.\n")
    print(
        "| B x H x n x d | case | forward PyTorch / kernels ms | ratio | fwd+bwd PyTorch / kernels ms | ratio | "
        "pairs / causal | GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, pattern, batch, heads, dim, dropout in CASES:
        theirs = timings(pattern, batch, heads, dim, dropout, use_kernels=False)
        ours = timings(pattern, batch, heads, dim, dropout, use_kernels=True)
        n = pattern.max_len
        flops = 3.5 * 2 * 2 * batch * heads * pairs(pattern) * dim
        print(
            f"| {batch} x {heads} x {n} x {dim} | {label} | {theirs[0] * 1e3:.2f} / {ours[0] * 1e3:.2f} | "
            f"{theirs[0] / ours[0]:.2f}x | {theirs[1] * 1e3:.2f} / {ours[1] * 1e3:.2f} | {theirs[1] / ours[1]:.2f}x | "
            f"{pairs(pattern) / (n * (n + 1) / 2):.0%} | {flops / ours[1] / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
