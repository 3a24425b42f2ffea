"""Whole-sequence causal attention on the CPU, forward and forward + backward: SDPA against the native kernels of
``dalle_transformer.native`` (which the ``auto`` backend trains ``full`` attention with on AVX-512 CPUs).

    python benchmarks/attention_kernels.py   # prints a Markdown table (``uvx nox -s bench_attention``)

Shapes of the benchmark configs' training steps (batch 8) and a longer sequence, without and with dropout. Medians
of repeated runs, SDPA then the kernels in one process; the kernels' forward + backward GFLOP/s count the causal
half of the score pairs (2 products forward, 5 backward, 2 d n (n + 1) / 2 FLOPs each per head).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from timing import machine, median_seconds

from dalle_transformer import kernels, native

# (label, batch, heads, n, dim_head, dropout)
CASES = [
    ("S", 8, 8, 96, 32, 0.0),
    ("M", 8, 8, 320, 64, 0.0),
    ("M, dropout 0.1", 8, 8, 320, 64, 0.1),
    ("32x32 image, text 256", 2, 8, 1280, 64, 0.0),
]


def timings(batch: int, heads: int, n: int, dim: int, dropout: float, use_kernels: bool) -> tuple[float, float]:
    """Median seconds of a forward (no autograd) and of a forward + backward."""
    qkv = torch.randn(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)  # the attention layer's layout
    grad = torch.randn(batch, heads, n, dim)
    leaf = qkv.detach().requires_grad_()

    def attend(x: torch.Tensor) -> torch.Tensor:
        out = kernels.attend_causal(x, dropout) if use_kernels else None
        if out is None:
            out = F.scaled_dot_product_attention(*x.unbind(0), dropout_p=dropout, is_causal=True)
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
    print("| B x H x n x d | case | forward SDPA / kernels ms | ratio | fwd+bwd SDPA / kernels ms | ratio | GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for label, batch, heads, n, dim, dropout in CASES:
        sdpa = timings(batch, heads, n, dim, dropout, use_kernels=False)
        ours = timings(batch, heads, n, dim, dropout, use_kernels=True)
        flops = 3.5 * 2 * 2 * batch * heads * n * (n + 1) / 2 * dim
        print(
            f"| {batch} x {heads} x {n} x {dim} | {label} | {sdpa[0] * 1e3:.2f} / {ours[0] * 1e3:.2f} | "
            f"{sdpa[0] / ours[0]:.2f}x | {sdpa[1] * 1e3:.2f} / {ours[1] * 1e3:.2f} | {sdpa[1] / ours[1]:.2f}x | "
            f"{flops / ours[1] / 1e9:.0f} |"
        )


if __name__ == "__main__":
    main()
