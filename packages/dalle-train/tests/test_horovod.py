"""Horovod with two real processes (gloo on CPU, launched by ``horovodrun``), against one process.

Two processes with 2 micro-batches of 2 samples each accumulate, average and clip the same gradients as one process
with batch 8, so the loss curves and weights agree up to float reduction order. Tolerance: 2e-5 absolute on the loss
and on every trained and EMA weight after 8 AdamW steps (measured: at most 2.4e-7 on the loss and 1.2e-8 on weights).
Horovod builds from source (``nox -s distributed`` builds it and runs these tests; elsewhere they skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics, step_losses, tiny_dalle_run
from distributed_runs import TOLERANCE, assert_close_weights, copy_checkpoint, final_weights, resume_in_one_process

from dalle_core.checkpoint import write_json
from dalle_core.config import from_dict
from dalle_core.errors import MissingExtraError
from dalle_train.backends import make_backend
from dalle_train.checkpoints import list_checkpoints, read_run_info
from dalle_train.run import run_training
from dalle_train.run_config import BackendConfig, RunConfig


def horovodrun(config: dict, output: Path, tmp_path: Path, name: str) -> None:
    config_file = tmp_path / f"{name}.json"
    write_json(config_file, config)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HOROVOD_GLOO_IFACE": "lo"}
    launcher = Path(sys.executable).parent / "horovodrun"  # beside this interpreter, in the same environment
    command = [str(launcher), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m", "dalle_train"]
    command += ["--config", str(config_file), "--output", str(output)]
    try:
        result = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"horovodrun timed out: {timeout.stdout!s:.3000} {timeout.stderr!s:.5000}")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


def test_horovod_matches_one_process_and_resumes_across_backends(tmp_path, token_assets):
    pytest.importorskip("horovod.torch")
    single = tmp_path / "single"
    run_training(from_dict(RunConfig, tiny_dalle_run(token_assets, ema_decay=0.9)), single)
    reference = step_losses(single / "dalle" / "metrics.jsonl")

    # Horovod resumes the single run's step-2 checkpoint: 2 processes x 2 micro-batches x 2 samples.
    horovod = tmp_path / "horovod"
    copy_checkpoint(single, 2, horovod)
    horovodrun(
        tiny_dalle_run(token_assets, backend="horovod", ema_decay=0.9, grad_accum_steps=2), horovod, tmp_path, "h"
    )
    losses = step_losses(horovod / "dalle" / "metrics.jsonl")
    assert sorted(losses) == [3, 4, 5, 6, 7, 8]
    assert max(abs(losses[s] - reference[s]) for s in losses) < TOLERANCE, (losses, reference)
    assert_close_weights(final_weights(horovod), final_weights(single))
    last = list_checkpoints(horovod / "dalle")[-1][1]
    assert read_run_info(last)["backend"] == "horovod" and read_run_info(last)["world_size"] == 2

    # One process resumes the Horovod run's step-6 checkpoint and ends where the uninterrupted run did.
    again = tmp_path / "again"
    resume_in_one_process(horovod, 6, again, token_assets, ema_decay=0.9)
    assert_close_weights(final_weights(again), final_weights(single))
    assert read_metrics(again / "dalle" / "metrics.jsonl")[-1]["step"] == 8


def test_missing_horovod_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # as if it were not installed, whether or not it is
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(MissingExtraError, match=r"dalle-train\[horovod\]"):
        make_backend(BackendConfig(kind="horovod", device="cpu"))
