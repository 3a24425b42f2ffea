"""GPU benchmarks (issue #10, point 4): checks first, then training MFU and decode-step latency against their bounds.

    python benchmarks/gpu.py [--quick] [--json results.json]

Needs a CUDA GPU and only torch, dalle-core and dalle-transformer (run by ``nox -s bench_gpu``, or with the two
packages' ``src`` on PYTHONPATH). It measures the machine's two ceilings (a large bf16 matrix product, a large
device-to-device copy), then:

- checks: CUDA-graph decoding gives the eager step's logits for every attention type and layer option, and the same
  sampled ids; bf16 training's loss is fp32's within bf16 rounding. A failed check stops the run.
- training: tokens/s and MFU (model FLOPs the step needs / the GPU's dense bf16 peak) for fp32, bf16 autocast, and
  bf16 autocast with ``torch.compile``; SDPA (flash) for full attention, FlexAttention for the others.
- decoding: one KV-cached step's latency, eager and replayed from a CUDA graph, against the memory-bandwidth bound
  (weight and KV-cache bytes a step must read / measured bandwidth); seconds per generated batch.

Prints a Markdown report (appended to docs/benchmarks.md by hand, with the run's date and device).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from configs import ATTENTION_TYPES, CONFIGS, GENERATE_BATCH, NUM_IMAGE_TOKENS, NUM_TEXT_TOKENS
from timing import random_batch

from dalle_transformer import DALLE, DALLEConfig
from dalle_transformer.accounting import forward_attention_work

# Datasheet dense bf16 tensor-core peaks, the MFU denominator (the measured matmul ceiling is reported too); on a
# GPU not listed here MFU is against the measured ceiling, and the report says so.
# Most specific name first: the PCIe/NVL parts are slower than the SXM ones of the same name.
DATASHEET_BF16_PEAKS = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200 NVL": 835.5e12,
    "H200": 989.4e12,
    "A100": 312e12,
}


def bf16_peak(device_name: str, measured: float) -> tuple[float, str]:
    """The MFU denominator and where it comes from."""
    for part, peak in DATASHEET_BF16_PEAKS.items():
        if part in device_name:
            return peak, f"the {part} datasheet's {peak / 1e12:.0f} TFLOP/s dense bf16"
    return measured, "the measured bf16 matrix-product ceiling (no datasheet figure for this GPU here)"


# A size that fills the GPU, beside the CPU-sized S and M.
LARGE = {"dim": 1024, "depth": 16, "heads": 16, "dim_head": 64, "image_fmap_size": 32, "text_seq_len": 128}
ALL_CONFIGS = {**CONFIGS, "L": LARGE}


def cuda_seconds(function: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``function`` timed with CUDA events."""
    for _ in range(warmup):
        function()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def ceilings() -> dict:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul = 2 * 8192**3 / cuda_seconds(lambda: a @ b, 10, warmup=3)
    source = torch.randn(2**30 // 4, device="cuda")  # 1 GiB
    target = torch.empty_like(source)
    copy = 2 * source.numel() * 4 / cuda_seconds(lambda: target.copy_(source), 10, warmup=3)
    return {"bf16_matmul_flops": matmul, "copy_bytes_per_s": copy}


def build(name: str, attention: str = "full", **options: object) -> DALLE:
    fields = set(DALLEConfig.__dataclass_fields__)
    config = {k: v for k, v in ALL_CONFIGS[name].items() if k in fields}
    if attention != "full":
        config["attn_types"] = (attention,)
    config.update(options)
    torch.manual_seed(0)
    return DALLE(DALLEConfig(num_text_tokens=NUM_TEXT_TOKENS, num_image_tokens=NUM_IMAGE_TOKENS, **config)).cuda()


def training_flops_per_token(config: DALLEConfig) -> float:
    """FLOPs a training step needs per token (3x the forward): block matmuls, the attention pairs the masks allow,
    and logits over the vocabulary each position can emit."""
    dim, inner, length = config.dim, config.heads * config.dim_head, config.total_seq_len
    ff_in = config.ff_mult * dim * (2 if config.ff_activation == "geglu" else 1)
    block_params = 3 * dim * inner + inner * dim + dim * ff_in + config.ff_mult * dim * dim
    attention = 4 * inner * forward_attention_work(config).allowed
    text_len, image_len = config.text_seq_len, config.image_seq_len
    logits = 2 * dim * (text_len * config.num_text_logits + image_len * config.num_image_tokens)
    return 3 * (2 * block_params * config.depth * length + attention + logits) / length


# ---------------------------------------------------------------- checks


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def check_graph_decoding(quick: bool) -> list[dict]:
    """Teacher-forced logits of eager and graph-replayed decoding steps, and seeded generations, for M."""
    variants = {kind: {"attention": kind} for kind in ATTENTION_TYPES}
    variants["every_option"] = {
        "attention": "full",
        "rotary_emb": True,
        "shift_tokens": True,
        "sandwich_norm": True,
        "layer_scale": True,
        "ff_activation": "geglu",
        "reversible": True,
        "attn_types": ("axial_row", "conv_like", "full"),
    }
    if quick:
        variants = {k: variants[k] for k in ("full", "every_option")}
    results = []
    for label, options in variants.items():
        options = dict(options)
        model = build("M", str(options.pop("attention")), **options).eval()
        text, image = random_batch(CONFIGS["M"], GENERATE_BATCH, seed=1)
        text, image = text.cuda(), image.cuda()
        with torch.inference_mode():
            expected = model(text, image).image_logits
            eager_cache = model.new_cache(GENERATE_BATCH)
            eager = [model.prefill(text, eager_cache)]
            stepper = model._image_stepper(model.prepare_text(text), use_cache=True)
            graphed = [stepper(image[:, :0])]
            for k in range(model.config.image_seq_len - 1):
                eager.append(model.decode_step(image[:, k], eager_cache))
                graphed.append(stepper(image[:, : k + 1]))
        eager_logits, graph_logits = torch.stack(eager, 1), torch.stack(graphed, 1)
        generated = []
        for use_graphs in (False, True):
            model.cuda_graph_decoding = use_graphs
            generated.append(
                model.generate_image_ids(text, top_k=64, cond_scale=3.0, generator=torch.Generator().manual_seed(0))
            )
        result = {
            "variant": label,
            "eager_vs_forward": relative_error(eager_logits, expected),
            "graph_vs_eager": relative_error(graph_logits, eager_logits),
            "same_ids_fraction": float((generated[0] == generated[1]).float().mean()),
        }
        results.append(result)
        if not result["graph_vs_eager"] < 1e-5 or not result["eager_vs_forward"] < 1e-4:
            raise SystemExit(f"graph decoding check failed: {result}")
    return results


def check_bf16_loss() -> dict:
    model = build("M")
    text, image = (t.cuda() for t in random_batch(CONFIGS["M"], 8))
    with torch.no_grad():
        fp32 = float(model(text, image).loss)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = float(model(text, image).loss)
    result = {"fp32_loss": fp32, "bf16_loss": bf16, "relative": abs(bf16 - fp32) / fp32}
    if not result["relative"] < 1e-2:
        raise SystemExit(f"bf16 loss check failed: {result}")
    return result


# ---------------------------------------------------------------- training


def train(name: str, attention: str, batch: int, mode: str, repeats: int, peak: float) -> dict:
    model = build(name, attention).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if mode.endswith("compile"):
        model.compile()
    text, image = (t.cuda() for t in random_batch(ALL_CONFIGS[name], batch))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode.startswith("bf16"))

    def step() -> None:
        with autocast:
            loss = model(text, image).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    seconds = cuda_seconds(step, repeats, warmup=2)
    tokens_per_s = batch * model.config.total_seq_len / seconds
    return {
        "config": name,
        "attention": attention,
        "batch": batch,
        "mode": mode,
        "tokens_per_s": tokens_per_s,
        "mfu": training_flops_per_token(model.config) * tokens_per_s / peak,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first,
    }


# ---------------------------------------------------------------- decoding


def step_bytes(model: DALLE, batch: int) -> int:
    """Bytes one decode step must read at least: every weight it uses once, and the cache it attends over."""
    config = model.config
    size = model.to_logits.weight.element_size()
    blocks = sum(p.numel() for p in model.blocks.parameters())
    logits = config.dim * (config.num_image_tokens + 1)
    # Half the cache on average over a generation (it fills up), keys and values, every layer.
    cache = config.depth * 2 * batch * config.heads * config.total_seq_len // 2 * config.dim_head
    return (blocks + logits + cache) * size


def decode(name: str, dtype: torch.dtype, cond_scale: float, repeats: int, bandwidth: float) -> dict:
    model = build(name).eval().to(dtype)
    text, _ = random_batch(ALL_CONFIGS[name], GENERATE_BATCH)
    text = text.cuda()
    rows = 2 * GENERATE_BATCH if cond_scale != 1 else GENERATE_BATCH
    row_text = torch.cat([text, torch.zeros_like(text)]) if cond_scale != 1 else text
    half = model.config.image_seq_len // 2
    ids = torch.randint(0, NUM_IMAGE_TOKENS, (rows,), device="cuda")
    result: dict = {"config": name, "dtype": str(dtype).removeprefix("torch."), "rows": rows}
    with torch.inference_mode():
        cache = model.new_cache(rows)
        model.prefill(row_text, cache)
        cache.length += half  # a step in the middle of the image: half the cache in use
        length = cache.length

        def eager_step() -> None:
            cache.length = length
            model.decode_step(ids, cache)

        result["eager_step_ms"] = cuda_seconds(eager_step, repeats * 5, warmup=3) * 1e3
        from dalle_transformer.static_decode import StaticDecoder

        graphed = StaticDecoder(model, cache, cuda_graph=True)

        def graph_step() -> None:
            cache.length = length
            graphed(ids, half)

        result["graph_step_ms"] = cuda_seconds(graph_step, repeats * 5, warmup=3) * 1e3
        compiled = StaticDecoder(model, cache, compile_step=True, cuda_graph=True)

        def compiled_step() -> None:
            cache.length = length
            compiled(ids, half)

        result["compiled_graph_step_ms"] = cuda_seconds(compiled_step, repeats * 5, warmup=3) * 1e3
    result["bound_ms"] = step_bytes(model, rows) / bandwidth * 1e3
    for use_graphs in (False, True):
        model.cuda_graph_decoding = use_graphs

        def generate() -> None:
            model.generate_image_ids(text, top_k=512, cond_scale=cond_scale, generator=torch.Generator().manual_seed(0))

        key = "graph_batch_s" if use_graphs else "eager_batch_s"
        result[key] = cuda_seconds(generate, repeats, warmup=1)
    return result


# ---------------------------------------------------------------- report


def markdown(results: dict) -> str:
    c = results["ceilings"]
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; {results['date']}. Measured ceilings: bf16 matrix "
        f"product {c['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s, device copy {c['copy_bytes_per_s'] / 1e12:.2f} TB/s "
        f"(bytes read + written). MFU is against {results['peak_source']}.",
        "",
        "| variant | graph vs eager logits (rel.) | eager vs forward (rel.) | same ids (guided, top-k 64) |",
        "| --- | --- | --- | --- |",
    ]
    for r in results.get("graph_checks", []):
        lines.append(
            f"| {r['variant']} | {r['graph_vs_eager']:.1e} | {r['eager_vs_forward']:.1e} | "
            f"{r['same_ids_fraction']:.1%} |"
        )
    if "bf16_check" in results:
        b = results["bf16_check"]
        lines += ["", f"bf16 vs fp32 loss (M, batch 8): {b['bf16_loss']:.5f} vs {b['fp32_loss']:.5f}."]
    lines.append("")
    lines += [
        "| config | attention | batch | mode | tokens/s | MFU | peak GiB | first step s (compile) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.get("training", []):
        lines.append(
            f"| {r['config']} | {r['attention']} | {r['batch']} | {r['mode']} | {r['tokens_per_s']:,.0f} | "
            f"{r['mfu']:.1%} | {r['peak_gib']:.1f} | {r['first_step_s']:.1f} |"
        )
    lines += [
        "",
        "| config | weights | rows | eager step ms | graph step ms | compiled graph step ms | bound ms | "
        "best / bound | eager s/batch | graph s/batch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results.get("decoding", []):
        best = min(r["graph_step_ms"], r["compiled_graph_step_ms"])
        lines.append(
            f"| {r['config']} | {r['dtype']} | {r['rows']} | {r['eager_step_ms']:.3f} | {r['graph_step_ms']:.3f} | "
            f"{r['compiled_graph_step_ms']:.3f} | {r['bound_ms']:.3f} | {best / r['bound_ms']:.1f}x | "
            f"{r['eager_batch_s']:.3f} | {r['graph_batch_s']:.3f} |"
        )
    return "\n".join(lines)


def training_runs(quick: bool) -> list[tuple[str, str, int, str]]:
    if quick:
        return [("M", "full", 8, "bf16+compile"), ("M", "axial_row", 8, "bf16"), ("L", "full", 16, "bf16")]
    runs = [("M", "full", 8, mode) for mode in ("fp32", "bf16", "bf16+compile")]
    runs += [("M", "full", 64, "bf16+compile"), ("M", "axial_row", 64, "bf16"), ("M", "conv_like", 64, "bf16")]
    return runs + [("L", "full", 16, mode) for mode in ("bf16", "bf16+compile")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few variants and repeats (a smoke test)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--part", choices=("all", "checks", "training", "decoding"), default="all")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU; torch.cuda.is_available() is False here")
    repeats = 3 if args.quick else 5
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "ceilings": ceilings(),
    }
    peak, results["peak_source"] = bf16_peak(results["device"], results["ceilings"]["bf16_matmul_flops"])
    print(json.dumps(results["ceilings"]), flush=True)
    if args.part in ("all", "checks"):
        results["graph_checks"] = check_graph_decoding(args.quick)
        results["bf16_check"] = check_bf16_loss()
        print("checks passed", flush=True)
    if args.part in ("all", "training"):
        results["training"] = []
        for run in training_runs(args.quick):
            results["training"].append(train(*run, repeats=repeats, peak=peak))
            print(json.dumps(results["training"][-1]), flush=True)
    if args.part in ("all", "decoding"):
        decodes = [("M", torch.float32, 1.0), ("M", torch.bfloat16, 3.0), ("L", torch.bfloat16, 1.0)]
        bandwidth = results["ceilings"]["copy_bytes_per_s"]
        results["decoding"] = []
        for name, dtype, cond_scale in decodes[1:2] if args.quick else decodes:
            results["decoding"].append(decode(name, dtype, cond_scale, repeats, bandwidth))
            print(json.dumps(results["decoding"][-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(markdown(results))


if __name__ == "__main__":
    main()
