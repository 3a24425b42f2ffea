from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import TinyImages

from dalle_core.checkpoint import load_weights
from dalle_core.errors import ConfigError, VocabularyError
from dalle_tokenizers import SimpleTokenizer
from dalle_train.bundle import load_bundle, save_bundle
from dalle_train.checkpoints import list_checkpoints
from dalle_train.config import DALLETrainConfig, LoopConfig, OptimizerConfig, VAETrainConfig
from dalle_train.dalle_trainer import build_model_config, train_dalle
from dalle_train.tokenized import pretokenize
from dalle_train.vae_trainer import train_vae
from dalle_vae import DiscreteVAE, DiscreteVAEConfig

VAE_CONFIG = DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=16, codebook_dim=16, hidden_dim=16)


def vae_config(steps: int) -> VAETrainConfig:
    loop = LoopConfig(steps=steps, batch_size=8, sample_every=5, checkpoint_every=5, keep_last=2, log_every=1)
    return VAETrainConfig(vae=VAE_CONFIG, loop=loop, optimizer=OptimizerConfig(lr=3e-3))


def dalle_config(steps: int) -> DALLETrainConfig:
    loop = LoopConfig(steps=steps, batch_size=8, sample_every=5, checkpoint_every=5, keep_last=2, log_every=1)
    return DALLETrainConfig(
        model={"dim": 32, "depth": 2, "heads": 2, "dim_head": 16},
        text_seq_len=16,
        loop=loop,
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=2),
    )


def test_vae_training_resumes_exactly(tmp_path):
    data = TinyImages()
    straight = train_vae(vae_config(10), data, tmp_path / "straight")
    # A run killed after its step-5 checkpoint: only that checkpoint is left on disk.
    train_vae(vae_config(10), data, tmp_path / "resumed")
    shutil.rmtree(list_checkpoints(tmp_path / "resumed")[-1][1])
    resumed = train_vae(vae_config(10), data, tmp_path / "resumed")
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [5, 10]
    assert (tmp_path / "straight" / "samples" / "vae-step-000010.png").is_file()
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reconstruction_loss" in r] == list(range(1, 11))
    assert any("codes_used" in r for r in records)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    config = vae_config(15)
    train_vae(config, TinyImages(), tmp_path)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10, 15]


def test_dalle_training_learns_resumes_exactly_and_writes_a_bundle(tmp_path):
    data = TinyImages()
    tokenizer = SimpleTokenizer()
    vae = DiscreteVAE(VAE_CONFIG).eval()
    tokens = pretokenize(data, tokenizer, vae, text_seq_len=16)
    assert tokens.text_ids.shape == (16, 16) and tokens.image_ids.shape == (16, 16)
    assert tokenizer.decode(tokens.text_ids[:1]) == ["a red square"]

    straight = train_dalle(
        dalle_config(10), tokens, tokenizer, vae, tmp_path / "straight", sample_prompts=["a red square"]
    )
    train_dalle(dalle_config(10), tokens, tokenizer, vae, tmp_path / "resumed")
    shutil.rmtree(list_checkpoints(tmp_path / "resumed")[-1][1])
    resumed = train_dalle(dalle_config(10), tokens, tokenizer, vae, tmp_path / "resumed")
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name

    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0], "ten steps at lr 3e-3 must lower the training loss"
    assert (tmp_path / "straight" / "samples" / "dalle-step-000010.png").is_file()

    checkpoint = list_checkpoints(tmp_path / "straight")[-1][1]
    bundle = load_bundle(checkpoint)
    assert bundle.model.config == straight.config
    ids = tokens.text_ids[:2]
    assert torch.equal(
        bundle.model(ids, tokens.image_ids[:2]).image_logits, straight(ids, tokens.image_ids[:2]).image_logits
    )
    _, saved = load_weights(checkpoint / "model" / "image_tokenizer")
    assert torch.equal(saved["codebook.weight"], vae.codebook.weight)


def test_model_config_comes_from_the_tokenizers():
    vae = DiscreteVAE(VAE_CONFIG)
    config = build_model_config(dalle_config(1), SimpleTokenizer(), vae)
    assert (config.num_text_tokens, config.num_image_tokens, config.image_fmap_size) == (257, 16, 4)
    with pytest.raises(ConfigError, match="model.num_text_tokens comes from the tokenizers"):
        DALLETrainConfig(model={"num_text_tokens": 100})
    with pytest.raises(ConfigError, match=r"^unknown config field model\.dpth"):
        build_model_config(DALLETrainConfig(model={"dpth": 2}), SimpleTokenizer(), vae)


def test_mismatched_tokenizer_is_caught_before_an_embedding(tmp_path):
    vae = DiscreteVAE(VAE_CONFIG)
    config = build_model_config(dalle_config(1), SimpleTokenizer(), vae)
    from dalle_transformer import DALLE

    other_vae = DiscreteVAE(
        DiscreteVAEConfig(image_size=16, num_layers=2, num_tokens=32, codebook_dim=16, hidden_dim=16)
    )
    with pytest.raises(
        VocabularyError, match="image tokenizer has 32 codes but the transformer expects num_image_tokens=16"
    ):
        save_bundle(tmp_path / "b", DALLE(config), SimpleTokenizer(), other_vae)
    assert not (tmp_path / "b").exists()
