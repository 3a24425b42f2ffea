"""Run the benchmark suite: every measurement in a fresh process, medians inside each, results as JSON and as a
Markdown section appended to docs/benchmarks.md.

    python benchmarks/run.py --ours PYTHON [--peer PYTHON] [--configs S M] [--attention full axial_row ...]

``--ours`` / ``--peer`` name the interpreters of the two virtualenvs (ours has the workspace installed, the peer has
dalle-pytorch 1.6.6), so both are measured on the same machine in the same run and ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import ATTENTION_TYPES, CONFIGS, GENERATE_BATCH, model_flops_per_training_token  # noqa: E402

# Both systems run with glibc's malloc thresholds fixed, as the `dalle` entry points set them
# (dalle_core.allocator): otherwise whether large buffers are recycled or re-mapped on every call depends on each
# process's import history, which made either side's convolutions 2x slower at random.
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def measure(python: str, script: str, *args: str, time_limit: float | None = None) -> dict:
    """One measurement in a fresh process; past ``time_limit`` seconds it is stopped and recorded as
    ``{"over_s": time_limit}`` (a bound: the run would have taken longer)."""
    try:
        result = subprocess.run(
            [python, str(HERE / script), *args],
            capture_output=True,
            text=True,
            cwd=HERE,
            check=False,
            timeout=time_limit,
            env=MEASURE_ENV,
        )
    except subprocess.TimeoutExpired:
        return {"over_s": time_limit}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 and not lines:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(lines[-1]) if lines else {"error": "no result"}


OUR_MEASUREMENTS = ("train", "train_compiled", "generate", "generate_guided", "generate_compiled")


def combine(rounds: list[dict]) -> dict:
    """One measurement from its rounds: the median of each number over the rounds that gave one (the fields of the
    first such round otherwise); a measurement that failed or hit its time limit in every round stays as it was."""
    good = [result for result in rounds if "error" not in result and "over_s" not in result]
    if not good:
        return rounds[0]
    combined = dict(good[0])
    for key, value in good[0].items():
        values = [result.get(key) for result in good]
        if isinstance(value, (int, float)) and all(isinstance(v, (int, float)) for v in values):
            combined[key] = statistics.median(values)
    return combined


def gemm_rates(python: str) -> dict:
    """fp32 GEMM FLOP/s of this machine: ``sgemm`` through PyTorch's BLAS, ``onednn`` (None without it)."""
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]); from timing import sgemm_flops, onednn_gemm_flops; "
        "print(json.dumps({'sgemm': sgemm_flops(), 'onednn': onednn_gemm_flops()}))"
    )
    out = subprocess.run([python, "-c", code, str(HERE)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def machine(python: str) -> dict:
    code = "import sys, json; sys.path.insert(0, sys.argv[1]); from timing import machine; print(json.dumps(machine()))"
    out = subprocess.run([python, "-c", code, str(HERE)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def fmt(value: object, digits: int = 0) -> str:
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return "n/a"


def tokens_per_s(result: dict | None, tokens: int) -> float | None:
    """Measured image tokens/s, or for a run stopped at its time limit the upper bound ``tokens / limit``."""
    if not result:
        return None
    if "image_tokens_per_s" in result:
        return result["image_tokens_per_s"]
    return tokens / result["over_s"] if "over_s" in result else None


def generation_cell(result: dict | None, tokens: int) -> str:
    value = tokens_per_s(result, tokens)
    return f"< {value:,.1f}" if result and "over_s" in result and value else fmt(value)


def generation_ratio(ours: dict, theirs: dict | None, tokens: int) -> str:
    """ours / theirs for generation; ``>`` when theirs was stopped at the time limit (its rate is an upper bound)."""
    mine, peer = ours.get("image_tokens_per_s"), tokens_per_s(theirs, tokens)
    if mine is None or not peer:
        return "n/a"
    return f"{'> ' if theirs and 'over_s' in theirs else ''}{mine / peer:.2f}x"


def ratio(ours: dict, theirs: dict | None, key: str, invert: bool = False) -> str:
    if not theirs or key not in ours or key not in theirs:
        return "n/a"
    value = theirs[key] / ours[key] if invert else ours[key] / theirs[key]
    return f"{value:.2f}x"


def check_same_model(args: argparse.Namespace, name: str, attention: str) -> None:
    """Stop before measuring when the two sides' models differ in parameter count: their ratios would compare
    different models (as they did before ``configs.PEER_ARCHITECTURE``: a GELU MLP against a GEGLU one)."""
    ours = measure(args.ours, "bench_ours.py", "parameters", name, attention)
    peer = measure(args.peer, "bench_peer.py", "parameters", name, attention)
    if "error" in ours or "error" in peer:
        return  # a side that cannot build this config reports why in its measurements
    if ours != peer:
        raise SystemExit(
            f"{name}/{attention}: expected the same model on both sides, got parameters {ours} (ours) vs {peer} (peer)"
        )


def measure_config(args: argparse.Namespace, name: str, attention: str) -> dict:
    """Every measurement of one config and attention type, ``args.rounds`` times, combined by :func:`combine`; the
    training pair (ours, then the peer's) ``args.train_rounds`` times in all, its ratios kept pair by pair."""
    rounds: dict = {"ours": {}, "peer": {}}
    if args.peer:
        check_same_model(args, name, attention)
    # Each of the peer's measurements right after the one of ours it is divided by: this VM's speed drifts by 10%
    # over minutes, and with the peer's after all of ours (minutes of generation between) a ratio was as much the
    # drift's as the systems' (S training measured 1.84x and 2.16x in two runs an hour apart).
    peer_after = {"train": ("train", None), "generate": ("cached_loop", args.peer_time_limit)} if args.peer else {}
    plan = []
    for what in OUR_MEASUREMENTS:
        plan.append(("ours", args.ours, "bench_ours.py", what, None))
        if what in peer_after:
            plan.append(("peer", args.peer, "bench_peer.py", *peer_after[what]))
    # Rounds interleave the two systems, so a slow moment of this machine falls on both sides.
    for round_index in range(args.rounds):
        for side, python, script, what, time_limit in plan:
            result = measure(python, script, what, name, attention, time_limit=time_limit)
            rounds[side].setdefault(what, []).append(result)
        if args.peer and round_index == 0:  # minutes per batch: once
            result = measure(
                args.peer, "bench_peer.py", "generate_images", name, attention, time_limit=args.peer_time_limit
            )
            rounds["peer"]["generate_images"] = [result]
    for _ in range(args.train_rounds - args.rounds):
        rounds["ours"]["train"].append(measure(args.ours, "bench_ours.py", "train", name, attention))
        if args.peer:
            rounds["peer"]["train"].append(measure(args.peer, "bench_peer.py", "train", name, attention))
    entry = {side: {what: combine(results) for what, results in by_what.items()} for side, by_what in rounds.items()}
    if args.peer:
        entry["train_ratios"] = paired_ratios(rounds["ours"]["train"], rounds["peer"]["train"], "tokens_per_s")
    return entry


def measure_vae(args: argparse.Namespace, name: str) -> dict:
    """The VAE's encode and decode speeds, ours then the peer's, ``args.rounds`` times, combined by :func:`combine`
    (the same network on both sides: its speed is PyTorch's convolutions', so these show the measurement's noise)."""
    rounds: dict = {"ours": [], "peer": []}
    for _ in range(args.rounds):
        rounds["ours"].append(measure(args.ours, "bench_ours.py", "vae", name))
        if args.peer:
            rounds["peer"].append(measure(args.peer, "bench_peer.py", "vae", name))
    return {side: combine(results) if results else {} for side, results in rounds.items()}


def paired_ratios(ours: list[dict], theirs: list[dict], key: str) -> list[float]:
    """ours / theirs of each pair measured back to back where both sides gave ``key``: this VM's speed drifts by
    10% over minutes, less within a pair, so the median of these is steadier than the ratio of the two medians."""
    return [mine[key] / peer[key] for mine, peer in zip(ours, theirs, strict=True) if key in mine and key in peer]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours", required=True)
    parser.add_argument("--peer")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--attention", nargs="+", default=list(ATTENTION_TYPES))
    parser.add_argument("--output", default=str(HERE.parent / "docs" / "benchmarks.md"))
    parser.add_argument(
        "--peer-time-limit",
        type=float,
        default=600.0,
        help="seconds after which a peer generation measurement is stopped and reported as a bound "
        "(DALLE-pytorch's generate_images re-runs the whole sequence per token: over 14 min per batch on M conv_like)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each config this many times, the two systems interleaved, and report medians over the rounds "
        "(DALLE-pytorch's generate_images once)",
    )
    parser.add_argument(
        "--train-rounds",
        type=int,
        help="measure training (ours, then the peer's) this many times in all, the rounds' and then pairs of "
        "training alone (default: --rounds); the ratio is the median of the pairs' ratios",
    )
    args = parser.parse_args()
    # abspath, not resolve: a virtualenv's python is a symlink whose target is outside the virtualenv.
    args.ours = os.path.abspath(args.ours)
    args.peer = os.path.abspath(args.peer) if args.peer else None

    if args.rounds < 1:
        parser.error(f"--rounds: expected at least 1, got {args.rounds}")
    if args.train_rounds is None:
        args.train_rounds = args.rounds
    elif args.train_rounds < args.rounds:
        parser.error(f"--train-rounds: expected at least --rounds ({args.rounds}), got {args.train_rounds}")
    rates = gemm_rates(args.ours)
    results: dict = {
        "machine": machine(args.ours),
        "sgemm_flops": rates["sgemm"],
        "onednn_gemm_flops": rates["onednn"],
        "rounds": args.rounds,
        "train_rounds": args.train_rounds,
        "runs": {},
    }
    for name in args.configs:
        for attention in args.attention:
            key = f"{name}/{attention}"
            entry = measure_config(args, name, attention)
            results["runs"][key] = entry
            print(key, json.dumps(entry), flush=True)
        results["runs"][f"{name}/vae"] = measure_vae(args, name)
    (HERE / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    append_markdown(results, Path(args.output))


def append_markdown(results: dict, path: Path) -> None:
    info = results["machine"]
    sgemm_flops, onednn_flops = results["sgemm_flops"], results.get("onednn_gemm_flops")
    # The fraction is of the fastest fp32 GEMM measured here, whichever library it is in.
    best_flops = max(sgemm_flops, onednn_flops or 0.0)
    onednn_note = f", in oneDNN {onednn_flops / 1e9:.1f}" if onednn_flops else ""
    lines = [
        f"\n## {info['date']}: {info['processor']} ({info.get('cpu_capability', '?')}), {info['threads']} threads, "
        f"torch {info['torch']}\n",
        f"Machine: `{info['platform']}`; measured fp32 GEMM (1024^3): through PyTorch's BLAS (sgemm) "
        f"{sgemm_flops / 1e9:.1f} GFLOP/s{onednn_note}; the sgemm fraction below is of the faster, as measured again "
        "just before and after each training measurement's steps, in its process. Medians of repeated "
        "runs, each measurement in a fresh process"
        + (f", medians over {results['rounds']} interleaved rounds" if results.get("rounds", 1) > 1 else "")
        + (
            f"; training measured {results['train_rounds']} times on each side"
            if results.get("train_rounds", 1) > results.get("rounds", 1)
            else ""
        )
        + "; ratios are ours / DALLE-pytorch 1.6.6 measured in the same run, the peer's training and cached loop "
        "each right after our training and generation; the training ratio is the median of the pairs' ratios "
        "(lowest-highest pair in brackets).\n",
        "| config | attention | train tok/s (ours) | train tok/s (peer) | ratio | sgemm fraction | peak MiB ours/peer "
        "| train compiled (first step s) | compiled ratio | gen img-tok/s | guided | compiled (first batch s) "
        "| peer cached loop | peer generate_images | vs loop "
        "| compiled vs loop | vs generate_images |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    from configs import CONFIGS as configs

    for key, entry in results["runs"].items():
        name, attention = key.split("/")
        if attention == "vae":
            continue
        ours, peer = entry["ours"], entry.get("peer") or {}
        train, peer_train = ours.get("train", {}), peer.get("train")
        fraction = "n/a"
        if "tokens_per_s" in train and attention == "full":
            flops = train["tokens_per_s"] * model_flops_per_training_token(configs[name])
            fraction = f"{flops / train.get('gemm_flops', best_flops):.0%}"
        memory = (
            f"{train['peak_mib']:.0f} / {peer_train['peak_mib']:.0f}"
            if peer_train and "peak_mib" in train and "peak_mib" in peer_train
            else fmt(train.get("peak_mib"))
        )
        train_compiled = ours.get("train_compiled", {})
        first_step = train_compiled.get("first_step_seconds")
        train_compiled_cell = fmt(train_compiled.get("tokens_per_s")) + (f" ({first_step:.0f})" if first_step else "")
        gen, guided, compiled = (ours.get(k, {}) for k in ("generate", "generate_guided", "generate_compiled"))
        first = compiled.get("first_batch_seconds")
        compiled_cell = fmt(compiled.get("image_tokens_per_s")) + (f" ({first:.0f})" if first else "")
        loop, full = peer.get("cached_loop"), peer.get("generate_images")
        tokens = GENERATE_BATCH * configs[name]["image_fmap_size"] ** 2
        lines.append(
            f"| {name} | {attention} | {fmt(train.get('tokens_per_s'))} "
            f"| {fmt((peer_train or {}).get('tokens_per_s'))} "
            f"| {train_ratio_cell(entry.get('train_ratios'))} | {fraction} | {memory} "
            f"| {train_compiled_cell} | {ratio(train_compiled, peer_train, 'tokens_per_s')} "
            f"| {fmt(gen.get('image_tokens_per_s'))} | {fmt(guided.get('image_tokens_per_s'))} | {compiled_cell} "
            f"| {generation_cell(loop, tokens)} | {generation_cell(full, tokens)} "
            f"| {generation_ratio(gen, loop, tokens)} | {generation_ratio(compiled, loop, tokens)} "
            f"| {generation_ratio(gen, full, tokens)} |"
        )
    lines += attention_work_lines(results)
    lines.append("\n| config | VAE encode img/s (ours / peer) | VAE decode img/s (ours / peer) |\n|---|---|---|")
    for key, entry in results["runs"].items():
        if key.endswith("/vae"):
            ours, peer = entry["ours"], entry.get("peer") or {}
            lines.append(
                f"| {key.split('/')[0]} | {fmt(ours.get('encode_images_per_s'))} / "
                f"{fmt(peer.get('encode_images_per_s'))} | {fmt(ours.get('decode_images_per_s'))} / "
                f"{fmt(peer.get('decode_images_per_s'))} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nAppended by `uvx nox -s bench` and `uvx nox -s bench_peer`; newest last.\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def train_ratio_cell(pairs: list[float] | None) -> str:
    """The median of the training pairs' ratios, with the lowest and highest where there are several; n/a without
    a pair (no peer, or no pair where both sides measured)."""
    if not pairs:
        return "n/a"
    spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else ""
    return f"{statistics.median(pairs):.2f}x{spread}"


def attention_work_lines(results: dict) -> list[str]:
    """Attention score pairs per batch row and head, all layers (x 4 * dim_head = FLOPs of QK^T and PV)."""
    lines = [
        "\nAttention work, score pairs per batch row and head summed over layers (FLOPs: x 4 x dim_head): a training "
        "forward (dense = every pair, the masked-SDPA reference; allowed = pairs the mask keeps; executed = what our "
        "CPU path computes) and the KV-cached decode of one image (all cached = every earlier position, as "
        "DALLE-pytorch's cache attends; executed = the keys our mask rows gather).\n",
        "| config | attention | dense | allowed | executed | executed / dense | allowed / dense "
        "| decode: all cached | decode: executed | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in results["runs"].items():
        name, attention = key.split("/")
        pairs = entry["ours"].get("train", {}).get("attention_pairs") if attention != "vae" else None
        if not pairs:
            continue
        decode = entry["ours"].get("generate", {}).get("decode_attention_pairs") or {}
        decode_ratio = f"{decode['executed'] / decode['all_cached']:.0%}" if decode.get("all_cached") else "n/a"
        lines.append(
            f"| {name} | {attention} | {fmt(pairs['dense'])} | {fmt(pairs['allowed'])} | {fmt(pairs['executed'])} "
            f"| {pairs['executed'] / pairs['dense']:.0%} | {pairs['allowed'] / pairs['dense']:.0%} "
            f"| {fmt(decode.get('all_cached'))} | {fmt(decode.get('executed'))} | {decode_ratio} |"
        )
    return lines


if __name__ == "__main__":
    main()
