"""Benchmark configurations shared by our runner and the DALLE-pytorch peer runner (pure Python, no imports)."""

from __future__ import annotations

# Vocabulary sizes are DALLE-pytorch's defaults for text and a 1024-code VQGAN for images.
NUM_TEXT_TOKENS = 10000
NUM_IMAGE_TOKENS = 1024
TRAIN_BATCH = 8
# Timed training steps per measurement (their median): S's steps take a fifth of a second (ours) to half of one,
# too few of them and a moment of this VM's noise is the median.
TRAIN_REPEATS = {"S": 15, "M": 3}
# Timed VAE encodes and decodes (16 images each) per measurement: S's take 6-40 ms, and with 5 either side's median
# was a moment of noise (ours 0.65-0.95x the same network's speed in the peer's process, 1.0x measured again).
VAE_REPEATS = 20
GENERATE_BATCH = 4

CONFIGS = {
    "S": {"dim": 256, "depth": 4, "heads": 8, "dim_head": 32, "image_fmap_size": 8, "text_seq_len": 32},
    "M": {"dim": 512, "depth": 8, "heads": 8, "dim_head": 64, "image_fmap_size": 16, "text_seq_len": 64},
}
ATTENTION_TYPES = ("full", "axial_row", "axial_col", "conv_like", "sparse")
# Our options that build DALLE-pytorch 1.6.6's model: its feed-forward is always gated (GEGLU, 2 x 4 x dim wide
# into the gate) and every branch is scaled by a LayerScale. Our defaults (a GELU MLP, no scales) do a quarter fewer
# block FLOPs, so without these the two sides would not be computing the same model.
PEER_ARCHITECTURE = {"ff_activation": "geglu", "layer_scale": True}


def model_flops_per_training_token(config: dict, num_text_tokens: int = NUM_TEXT_TOKENS) -> float:
    """FLOPs a training step needs per token (forward + backward = 3x forward), for full causal attention.

    Counts the matmuls of the blocks (QKV, output, the GEGLU feed-forward of ``PEER_ARCHITECTURE``), causal
    attention over the pairs it must see (L(L+1)/2 of L*L), and logits over the vocabulary each position can emit
    (text positions: text ids, image positions: image ids). Embedding lookups and norms are negligible and not counted.
    """
    dim, depth, inner = config["dim"], config["depth"], config["heads"] * config["dim_head"]
    text_len, image_len = config["text_seq_len"], config["image_fmap_size"] ** 2
    length = text_len + image_len
    gate = 2 if PEER_ARCHITECTURE["ff_activation"] == "geglu" else 1  # GEGLU: dim -> 2 x 4dim, then 4dim -> dim
    block_params = 3 * dim * inner + inner * dim + (gate + 1) * 4 * dim * dim
    attention_pairs = length * (length + 1) / 2
    attention_flops = depth * 2 * 2 * attention_pairs * inner  # QK^T and AV
    logits_flops = 2 * dim * (text_len * (num_text_tokens + text_len) + image_len * NUM_IMAGE_TOKENS)
    forward = 2 * block_params * depth * length + attention_flops + logits_flops
    return 3 * forward / length
