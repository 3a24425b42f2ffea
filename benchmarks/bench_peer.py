"""One measurement of DALLE-pytorch 1.6.6 (the peer), printed as a JSON line; run in the peer's own virtualenv.

Its `vae.py` imports taming-transformers at import time, which is not needed for these measurements: a placeholder
module stands in for it, in this process only. Same configs and batch sizes as ``bench_ours.py``.
"""

from __future__ import annotations

import json
import sys
import types
import warnings

import torch
from configs import (
    CONFIGS,
    GENERATE_BATCH,
    NUM_IMAGE_TOKENS,
    NUM_TEXT_TOKENS,
    TRAIN_BATCH,
    TRAIN_REPEATS,
    VAE_REPEATS,
)
from timing import median_seconds, peak_rss_mib, random_batch, run_measurement


def import_peer():
    for name in ("taming", "taming.models", "taming.models.vqgan"):
        sys.modules.setdefault(name, types.ModuleType(name))
    vqgan = sys.modules["taming.models.vqgan"]
    vqgan.VQModel = type("VQModel", (), {})  # type: ignore[attr-defined]
    vqgan.GumbelVQ = type("GumbelVQ", (), {})  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dalle_pytorch
    return dalle_pytorch


def build(name: str, attention: str):
    peer = import_peer()
    config = CONFIGS[name]
    fmap = config["image_fmap_size"]
    vae = peer.DiscreteVAE(
        image_size=fmap * 8, num_layers=3, num_tokens=NUM_IMAGE_TOKENS, codebook_dim=512, hidden_dim=64
    )
    if attention == "sparse":
        raise SystemExit(json.dumps({"skipped": "DALLE-pytorch's sparse attention needs DeepSpeed's CUDA kernels"}))
    # Rotary embeddings and token shifting off, as in ours with configs.PEER_ARCHITECTURE (its GEGLU feed-forward and
    # LayerScale are always on): both sides build the same model, which run.py checks by parameter count.
    model = peer.DALLE(
        dim=config["dim"],
        vae=vae,
        num_text_tokens=NUM_TEXT_TOKENS,
        text_seq_len=config["text_seq_len"],
        depth=config["depth"],
        heads=config["heads"],
        dim_head=config["dim_head"],
        attn_types=(attention,),
        shift_tokens=False,
        rotary_emb=False,
    )
    return peer, model


def train(name: str, attention: str, repeats: int) -> dict:
    config = CONFIGS[name]
    _, model = build(name, attention)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text, image = random_batch(config, TRAIN_BATCH)
    before = peak_rss_mib()

    def step() -> None:
        loss = model(text, image, return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = median_seconds(step, repeats, warmup=2)
    tokens = TRAIN_BATCH * (config["text_seq_len"] + config["image_fmap_size"] ** 2)
    return {"seconds_per_step": seconds, "tokens_per_s": tokens / seconds, "peak_mib": peak_rss_mib() - before}


@torch.no_grad()
def cached_loop(model, peer, text: torch.Tensor) -> torch.Tensor:
    """Its fastest correct generation: a hand-written loop passing a cache at cond_scale=1 (``generate_images``
    ignores ``use_cache`` there). Same top-k fraction and Gumbel sampling as ``generate_images``. Returns the image
    ids without decoding them, as our generation measurement does."""
    text_len, image_len = model.text_seq_len, model.image_seq_len
    out, cache = text, {}
    for _ in range(image_len):
        logits = model(out[:, :text_len], out[:, text_len:], cache=cache)[:, -1, :]
        sample = peer.dalle_pytorch.gumbel_sample(peer.dalle_pytorch.top_k(logits, thres=0.5), temperature=1.0)
        out = torch.cat((out, (sample - model.num_text_tokens)[:, None]), dim=-1)
    return out[:, -image_len:]


def generate(name: str, attention: str, repeats: int, mode: str) -> dict:
    config = CONFIGS[name]
    peer, model = build(name, attention)
    model.eval()
    text, _ = random_batch(config, GENERATE_BATCH)
    if mode == "generate_images":
        run = lambda: model.generate_images(text, filter_thres=0.5)  # noqa: E731
    elif mode == "generate_images_guided":
        run = lambda: model.generate_images(text.clone(), filter_thres=0.5, cond_scale=3.0, use_cache=True)  # noqa: E731
    else:
        run = lambda: cached_loop(model, peer, text)  # noqa: E731
    seconds = median_seconds(run, repeats, warmup=0 if name == "M" else 1)
    tokens = GENERATE_BATCH * config["image_fmap_size"] ** 2
    return {"seconds_per_batch": seconds, "image_tokens_per_s": tokens / seconds}


def vae(name: str, repeats: int) -> dict:
    peer = import_peer()
    fmap = CONFIGS[name]["image_fmap_size"]
    model = peer.DiscreteVAE(image_size=fmap * 8, num_layers=3, num_tokens=NUM_IMAGE_TOKENS).eval()
    images = torch.rand(16, 3, fmap * 8, fmap * 8)
    with torch.no_grad():
        ids = model.get_codebook_indices(images)
        encode = median_seconds(lambda: model.get_codebook_indices(images), repeats)
        decode = median_seconds(lambda: model.decode(ids), repeats)
    return {"encode_images_per_s": 16 / encode, "decode_images_per_s": 16 / decode}


def parameters(name: str, attention: str) -> dict:
    """Parameter counts of its transformer and of the whole model without the (unused, untrained) VAE."""
    _, model = build(name, attention)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
    return {"layers": sum(p.numel() for p in model.transformer.parameters()), "total": total}


def _generate(mode: str):
    return lambda name, attention: generate(name, attention, repeats=3 if name == "S" else 1, mode=mode)


MEASUREMENTS = {
    "parameters": parameters,
    "train": lambda name, attention: train(name, attention, repeats=TRAIN_REPEATS[name]),
    **{mode: _generate(mode) for mode in ("generate_images", "generate_images_guided", "cached_loop")},
    "vae": lambda name, attention: vae(name, repeats=VAE_REPEATS),
}


if __name__ == "__main__":
    run_measurement(sys.argv[1:], MEASUREMENTS)
