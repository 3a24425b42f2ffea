"""Few-row products (KV-cached decoding's projections) on the CPU: the weight-streaming product of
``dalle_transformer.linear`` on the weight as stored and on its column blocks, in GB/s of weight read.

    python benchmarks/few_rows.py            # prints a Markdown table (``uvx nox -s bench_few_rows``)

Each weight set is larger than the last-level cache (as a model's weights are, read once per decoding step), so the
numbers are memory-bound streaming rates, not cache-resident ones. Medians of repeated runs.
"""

from __future__ import annotations

import torch
from timing import machine, median_seconds

from dalle_transformer.linear import column_blocks, linear

# (out, in) of the projections of the benchmark's M model (dim 512) and of a 1024-wide one.
SHAPES = [(1536, 512), (512, 2048), (3072, 1024), (1024, 4096)]
ROWS = [1, 2, 4, 6, 8, 16]
BYTES_PER_SET = 160 * 2**20


def rate(weights: list[torch.Tensor], blocks: list[torch.Tensor | None], rows: int) -> float:
    x = torch.randn(rows, weights[0].shape[1])
    seconds = median_seconds(
        lambda: [linear(x, w, None, b) for w, b in zip(weights, blocks, strict=True)], repeats=7, warmup=2
    )
    return sum(w.numel() * w.element_size() for w in weights) / seconds / 1e9


def main() -> None:
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    info = machine()
    print(f"{info['date']}: `{info['platform']}`, {info['threads']} threads, torch {info['torch']}\n")
    print("| weight (out x in) | rows | as stored GB/s | column blocks GB/s | speed-up |")
    print("|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        count = max(4, BYTES_PER_SET // (out_features * in_features * 4))
        weights = [torch.randn(out_features, in_features) for _ in range(count)]
        for rows in ROWS:
            plain = rate(weights, [None] * count, rows)
            blocks = [column_blocks(w, rows) for w in weights]
            if blocks[0] is None:
                print(f"| {out_features} x {in_features} | {rows} | {plain:.1f} | (as stored) | |")
                continue
            blocked = rate(weights, blocks, rows)
            print(f"| {out_features} x {in_features} | {rows} | {plain:.1f} | {blocked:.1f} | {blocked / plain:.2f}x |")
            del blocks


if __name__ == "__main__":
    main()
