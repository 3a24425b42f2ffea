"""Timing and input helpers shared by both runners (they import torch and configs only)."""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from configs import NUM_IMAGE_TOKENS, NUM_TEXT_TOKENS


def median_seconds(function: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def random_batch(config: dict, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random text ids (no padding) and image ids for one benchmark config."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, NUM_TEXT_TOKENS, (batch, config["text_seq_len"]), generator=generator)
    image = torch.randint(0, NUM_IMAGE_TOKENS, (batch, config["image_fmap_size"] ** 2), generator=generator)
    return text, image


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sgemm_flops(size: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matrix-multiply throughput of this machine through PyTorch's BLAS (``a @ b``: MKL on x86), FLOP/s
    (median of ``repeats``)."""
    return _product_flops(torch.mm, size, repeats)


def onednn_gemm_flops(size: int = 1024, repeats: int = 10) -> float | None:
    """The same product's throughput in oneDNN (which uses AVX-512 where MKL may not: on AMD processors), FLOP/s;
    None where PyTorch is built without it."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None
    return _product_flops(lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), size, repeats)


def best_gemm_flops(repeats: int = 3) -> float:
    """The faster of :func:`sgemm_flops` and :func:`onednn_gemm_flops` (each a median of ``repeats``), FLOP/s."""
    return max(sgemm_flops(repeats=repeats), onednn_gemm_flops(repeats=repeats) or 0.0)


def seconds_and_gemm_flops(function: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """:func:`median_seconds` of ``function``, and :func:`best_gemm_flops` measured just before and just after its
    timed calls (their mean): a fraction of the machine's GEMM rate taken from the two then reads the machine in the
    same seconds. (This VM's speed drifts by a third within minutes, so a rate measured once for a whole run can
    fall in a faster or a slower minute than the calls it is compared with.)"""
    for _ in range(warmup):
        function()
    before = best_gemm_flops()
    seconds = median_seconds(function, repeats, warmup=0)
    return seconds, (before + best_gemm_flops()) / 2


def _product_flops(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], size: int, repeats: int) -> float:
    """FLOP/s of ``product`` on two random ``size x size`` float32 matrices (median of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / median_seconds(lambda: product(a, b), repeats, warmup=3)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }


def run_measurement(argv: list[str], measurements: Mapping[str, Callable[[str, str], dict]]) -> None:
    """A runner's command line, ``MEASUREMENT CONFIG [ATTENTION]``: prints that measurement's result as one JSON
    line (what ``run.py`` reads)."""
    what, name = argv[0], argv[1]
    attention = argv[2] if len(argv) > 2 else "full"
    if what not in measurements:
        raise SystemExit(f"unknown measurement {what!r}: expected one of {', '.join(measurements)}")
    torch.manual_seed(0)
    print(json.dumps(measurements[what](name, attention)))
