"""DDP and FSDP2 with two real processes (gloo on CPU) launched by torchrun, against one process.

One process with batch 8 and two processes with 4 each see the same samples (the data stream is split by global
position) and average the same gradients, so their loss curves agree up to float reduction order. Tolerance: 2e-5
absolute on the loss and on every trained and EMA weight after 8 AdamW steps (measured: at most 5e-7 and 1.2e-7).
"""

from __future__ import annotations

import pytest
from conftest import read_metrics, step_losses, tiny_dalle_run
from distributed_runs import (
    TOLERANCE,
    assert_close_weights,
    copy_checkpoint,
    final_weights,
    resume_in_one_process,
    torchrun,
)

from dalle_core.config import from_dict
from dalle_core.errors import ConfigError
from dalle_train.backends import DDPBackend, make_backend
from dalle_train.checkpoints import list_checkpoints, read_run_info
from dalle_train.run import run_training
from dalle_train.run_config import BackendConfig, RunConfig


def test_ddp_and_fsdp_match_one_process_and_resume_across_backends(tmp_path, token_assets):
    single = tmp_path / "single"
    run_training(from_dict(RunConfig, tiny_dalle_run(token_assets, ema_decay=0.9)), single)
    reference = step_losses(single / "dalle" / "metrics.jsonl")
    assert sorted(reference) == list(range(1, 9))

    # DDP from scratch, 2 processes x 4 samples.
    ddp = tmp_path / "ddp"
    torchrun(tiny_dalle_run(token_assets, backend="ddp", ema_decay=0.9), ddp, tmp_path, "ddp")
    losses = step_losses(ddp / "dalle" / "metrics.jsonl")
    assert losses.keys() == reference.keys()
    assert max(abs(losses[s] - reference[s]) for s in reference) < TOLERANCE, (losses, reference)
    assert_close_weights(final_weights(ddp), final_weights(single))

    # FSDP resumes the DDP run's step-4 checkpoint and finishes it.
    fsdp = tmp_path / "fsdp"
    copy_checkpoint(ddp, 4, fsdp)
    config = tiny_dalle_run(token_assets, backend="fsdp", ema_decay=0.9)
    config["backend"]["fsdp_units"] = ["Attention", "FeedForward"]  # nested units, gathered one at a time
    torchrun(config, fsdp, tmp_path, "fsdp")
    losses = step_losses(fsdp / "dalle" / "metrics.jsonl")
    assert sorted(losses) == [5, 6, 7, 8]
    assert max(abs(losses[s] - reference[s]) for s in losses) < TOLERANCE, (losses, reference)
    assert_close_weights(final_weights(fsdp), final_weights(single))
    last = list_checkpoints(fsdp / "dalle")[-1][1]
    assert read_run_info(last)["backend"] == "fsdp" and read_run_info(last)["world_size"] == 2
    assert (fsdp / "model" / "model.safetensors").is_file()  # a consolidated generation bundle

    # One process resumes the FSDP run's (gathered) step-6 checkpoint.
    again = tmp_path / "again"
    resume_in_one_process(fsdp, 6, again, token_assets, ema_decay=0.9)
    assert_close_weights(final_weights(again), final_weights(single))
    assert read_metrics(again / "dalle" / "metrics.jsonl")[-1]["step"] == 8


def test_distributed_backends_say_how_to_launch_them(monkeypatch):
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError, match=r"backend.kind=ddp must be launched by torchrun .*WORLD_SIZE"):
        DDPBackend(device="cpu")
    with pytest.raises(ConfigError, match=r"backend.kind=fsdp must be launched by torchrun"):
        make_backend(BackendConfig(kind="fsdp", device="cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backend.kind=single but torchrun started 2 processes"):
        make_backend(BackendConfig(kind="single"))


def test_backends_implement_the_protocol():
    from dalle_train.backends import Backend, DDPBackend, FSDPBackend, SingleBackend

    assert isinstance(SingleBackend("cpu"), Backend)
    for cls in (DDPBackend, FSDPBackend):
        assert all(callable(getattr(cls, name)) for name in ("prepare", "no_sync", "backward", "step", "save", "load"))
