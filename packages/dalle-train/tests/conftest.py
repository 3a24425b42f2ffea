from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset


class TinyImages(Dataset):
    """Coloured squares on black, 16x16, with a caption naming the colour: learnable in a few steps."""

    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}

    def __init__(self, count: int = 16) -> None:
        self.items = []
        names = list(self.colours)
        for index in range(count):
            name = names[index % len(names)]
            image = torch.zeros(3, 16, 16)
            offset = (index // len(names)) % 8
            image[:, offset : offset + 8, offset : offset + 8] = torch.tensor(self.colours[name]).view(3, 1, 1)
            self.items.append((image, f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: steady timings on a shared box, and results that match the subprocess runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------ tiny runs for the loop


def tiny_vae_config():
    from dalle_vae import DiscreteVAEConfig

    return DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=16, hidden_dim=16)


@pytest.fixture(scope="session")
def token_assets(tmp_path_factory):
    """A saved (untrained) tiny VAE and token shards of TinyImages encoded with it: what a dalle-only run needs."""
    from dalle_tokenizers import SimpleTokenizer
    from dalle_train.datasets.token_shards import tokenize_to_shards
    from dalle_vae import DiscreteVAE

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    vae = DiscreteVAE(tiny_vae_config()).eval()
    vae.save(root / "vae")
    tokenize_to_shards(TinyImages(32), root / "tokens", SimpleTokenizer(), vae, text_seq_len=16, shard_size=12)
    return root


def tiny_dalle_run(assets, steps: int = 8, backend: str = "single", **loop) -> dict:
    """A dalle-only run config (a plain dict, as read from YAML) on the token shards of ``token_assets``."""
    loop_config = {
        "steps": steps,
        "batch_size": 8,
        "log_every": 1,
        "sample_every": 1000,
        "checkpoint_every": 2,
        "keep_last": 10,
        **loop,
    }
    return {
        "stages": ["dalle"],
        "image_tokenizer": str(assets / "vae"),
        "data": {"kind": "token_shards", "path": str(assets / "tokens")},
        "tokenizer": {"kind": "simple"},
        "dalle": {
            "model": {"dim": 32, "depth": 2, "heads": 2, "dim_head": 16},
            "text_seq_len": 16,
            "loop": loop_config,
            "optimizer": {"lr": 3e-3, "warmup_steps": 2, "weight_decay": 0.01},
            "sample_prompts": ["a red square"],
        },
        "backend": {"kind": backend, "device": "cpu"},
        "logging": {"progress": False},
    }


def read_metrics(path):
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]


def step_losses(path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r}
