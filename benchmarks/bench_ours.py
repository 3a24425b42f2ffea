"""One measurement of our implementation, printed as a JSON line. Run by ``run.py`` in a fresh process each time,
so the peak memory reported belongs to that measurement alone.

    python benchmarks/bench_ours.py train S full
"""

from __future__ import annotations

import inspect
import json
import sys

import torch
from configs import (
    CONFIGS,
    GENERATE_BATCH,
    NUM_IMAGE_TOKENS,
    NUM_TEXT_TOKENS,
    PEER_ARCHITECTURE,
    TRAIN_BATCH,
    TRAIN_REPEATS,
    VAE_REPEATS,
)
from timing import median_seconds, peak_rss_mib, random_batch, run_measurement, seconds_and_gemm_flops

from dalle_train.config import OptimizerConfig
from dalle_train.optim import build_adamw
from dalle_transformer import DALLE, DALLEConfig
from dalle_transformer.accounting import decode_attention_work, forward_attention_work
from dalle_vae import DiscreteVAE, DiscreteVAEConfig


def build(name: str, attention: str) -> DALLE:
    config = {**CONFIGS[name], **PEER_ARCHITECTURE}
    fields = {f for f in DALLEConfig.__dataclass_fields__}
    options = {k: v for k, v in config.items() if k in fields}
    if attention != "full":
        if "attn_types" not in fields:
            raise SystemExit(json.dumps({"skipped": f"attention type {attention} not implemented"}))
        options["attn_types"] = (attention,)
    return DALLE(DALLEConfig(num_text_tokens=NUM_TEXT_TOKENS, num_image_tokens=NUM_IMAGE_TOKENS, **options))


def train(name: str, attention: str, repeats: int, compiled: bool = False) -> dict:
    """Tokens/s of training steps, and this machine's GEMM FLOP/s measured just before and after them (for the
    fraction of it that the steps reach); ``compiled``: with ``loop.compile`` (``nn.Module.compile``; the first
    step, which compiles, timed apart)."""
    config = CONFIGS[name]
    model = build(name, attention).train()
    if compiled:
        model.compile()
    optimizer = build_adamw(model, OptimizerConfig(lr=1e-4))  # what `dalle train` steps with
    text, image = random_batch(config, TRAIN_BATCH)
    before = peak_rss_mib()

    def step() -> None:
        loss = model.loss(text, image).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    first = median_seconds(step, repeats=1, warmup=0) if compiled else None
    seconds, gemm_flops = seconds_and_gemm_flops(step, repeats, warmup=2)
    tokens = TRAIN_BATCH * (config["text_seq_len"] + config["image_fmap_size"] ** 2)
    # Attention score pairs of one training forward, all layers, per batch row and head (x 4 * dim_head for FLOPs).
    work = forward_attention_work(model.config)
    return {
        "first_step_seconds": first,
        "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds,
        "gemm_flops": gemm_flops,
        "peak_mib": peak_rss_mib() - before,
        "attention_pairs": {"dense": work.dense, "allowed": work.allowed, "executed": work.efficient},
    }


def generate(name: str, attention: str, repeats: int, cond_scale: float, compiled: bool = False) -> dict:
    """Seconds per batch; ``compiled``: with ``compile_decoding`` (the first batch, which compiles, timed apart)."""
    config = CONFIGS[name]
    model = build(name, attention).eval()
    text, _ = random_batch(config, GENERATE_BATCH)
    options: dict = {"top_k": 512}
    if cond_scale != 1.0:
        if "cond_scale" not in inspect.signature(model.generate_image_ids).parameters:
            raise SystemExit(json.dumps({"skipped": "guidance not implemented"}))
        options["cond_scale"] = cond_scale

    def run() -> None:
        model.generate_image_ids(text, generator=torch.Generator().manual_seed(0), **options)

    first = None
    if compiled:
        model.compile_decoding = True
        first = median_seconds(run, repeats=1, warmup=0)
    seconds = median_seconds(run, repeats, warmup=0 if compiled else 1)
    tokens = GENERATE_BATCH * config["image_fmap_size"] ** 2
    work = decode_attention_work(model.config)
    return {
        "first_batch_seconds": first,
        "seconds_per_batch": seconds,
        "image_tokens_per_s": tokens / seconds,
        "decode_attention_pairs": {"all_cached": work.full_rows, "executed": work.gathered},
    }


def vae(name: str, repeats: int) -> dict:
    fmap = CONFIGS[name]["image_fmap_size"]
    # DALLE-pytorch's DiscreteVAE defaults (no resnet blocks, 512-dim codebook, 0.5 normalization), so both
    # systems run the same network.
    config = DiscreteVAEConfig(
        image_size=fmap * 8,
        num_layers=3,
        num_tokens=NUM_IMAGE_TOKENS,
        codebook_dim=512,
        num_resnet_blocks=0,
        decoder_input_conv=False,
        normalization=((0.5,) * 3, (0.5,) * 3),
    )
    model = DiscreteVAE(config).eval()
    images = torch.rand(16, 3, fmap * 8, fmap * 8)
    ids = model.encode(images)
    encode = median_seconds(lambda: model.encode(images), repeats)
    decode = median_seconds(lambda: model.decode(ids), repeats)
    return {"encode_images_per_s": 16 / encode, "decode_images_per_s": 16 / decode}


def parameters(name: str, attention: str) -> dict:
    """Parameter counts of the transformer layers and of the whole model, to check that both sides build the same
    model (``run.py`` compares them with the peer's before measuring)."""
    model = build(name, attention)
    return {
        "layers": sum(p.numel() for p in model.blocks.parameters()),
        "total": sum(p.numel() for p in model.parameters()),
    }


MEASUREMENTS = {
    "parameters": parameters,
    "train": lambda name, attention: train(name, attention, repeats=TRAIN_REPEATS[name]),
    "train_compiled": lambda name, attention: train(name, attention, repeats=TRAIN_REPEATS[name], compiled=True),
    "generate": lambda name, attention: generate(name, attention, repeats=3, cond_scale=1.0),
    "generate_guided": lambda name, attention: generate(name, attention, repeats=3, cond_scale=3.0),
    "generate_compiled": lambda name, attention: generate(name, attention, repeats=3, cond_scale=1.0, compiled=True),
    "vae": lambda name, attention: vae(name, repeats=VAE_REPEATS),
}


if __name__ == "__main__":
    run_measurement(sys.argv[1:], MEASUREMENTS)
