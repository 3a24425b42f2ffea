"""Helpers of the multi-process tests (DDP/FSDP, DeepSpeed, Horovod): launching, comparing, resuming (no tests here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import step_losses, tiny_dalle_run
from safetensors.torch import load_file

from dalle_core.checkpoint import load_weights, write_json
from dalle_core.config import from_dict
from dalle_train.checkpoints import list_checkpoints
from dalle_train.run import run_training
from dalle_train.run_config import RunConfig

# Absolute tolerance on losses and weights between N processes and one (float reduction order only).
TOLERANCE = 2e-5
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun(config: dict, output: Path, tmp_path: Path, name: str) -> None:
    """``python -m dalle_train`` on ``config`` in two torchrun processes (one thread each), which must succeed."""
    config_file = tmp_path / f"{name}.json"
    write_json(config_file, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for variable in RENDEZVOUS:
        env.pop(variable, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "dalle_train", "--config", str(config_file), "--output", str(output)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The trained weights and the EMA weights (``model/``, exported for generation) of the last checkpoint."""
    last = list_checkpoints(run / "dalle")[-1][1]
    trained = load_file(last / "state" / "weights.safetensors")
    averaged = load_weights(last / "model")[1]
    return {**{f"trained.{k}": v for k, v in trained.items()}, **{f"ema.{k}": v for k, v in averaged.items()}}


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=TOLERANCE, rtol=0), (name, float((a[name] - b[name]).abs().max()))


def copy_checkpoint(source_run: Path, step: int, target_run: Path) -> None:
    source = dict(list_checkpoints(source_run / "dalle"))[step]
    target = target_run / "dalle" / "checkpoints" / source.name
    target.parent.mkdir(parents=True)
    shutil.copytree(source, target)


def resume_in_one_process(source_run: Path, step: int, target_run: Path, assets: Path, **loop: object) -> None:
    """One plain process resumes ``source_run``'s checkpoint of ``step`` and trains the rest of the 8 steps."""
    copy_checkpoint(source_run, step, target_run)
    run_training(from_dict(RunConfig, tiny_dalle_run(assets, **loop)), target_run)
    assert sorted(step_losses(target_run / "dalle" / "metrics.jsonl")) == list(range(step + 1, 9))
