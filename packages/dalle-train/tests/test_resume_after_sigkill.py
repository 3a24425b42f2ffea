"""A run killed with SIGKILL at a random step, then resumed, ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import torch
from conftest import step_losses, tiny_dalle_run
from safetensors.torch import load_file

from dalle_core.checkpoint import write_json
from dalle_core.config import from_dict
from dalle_train.checkpoints import list_checkpoints
from dalle_train.run import run_training
from dalle_train.run_config import RunConfig

STEPS = 40


def launch(config_file, output) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dalle_train", "--config", str(config_file), "--output", str(output)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(output) -> int:
    path = output / "dalle" / "metrics.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    return len(lines)


def test_sigkill_at_a_random_step_then_resume_is_exact(tmp_path, token_assets):
    config = tiny_dalle_run(token_assets, steps=STEPS, checkpoint_every=3, keep_last=2, sample_every=15)
    config["dalle"]["loop"]["ema_decay"] = 0.9  # the EMA must resume exactly too
    config_file = tmp_path / "run.json"
    write_json(config_file, config)

    killed = tmp_path / "killed"
    target = random.Random().randint(4, STEPS - 8)  # a fresh random step on every run of the test
    process = launch(config_file, killed)
    deadline = time.monotonic() + 240
    while logged_steps(killed) < target and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    done = [step for step, _ in list_checkpoints(killed / "dalle")]
    assert done and done[-1] < STEPS, f"killed at step ~{target}, checkpoints {done}: the run should be unfinished"

    resumed = launch(config_file, killed)
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-3000:]
    assert "model:" in out

    straight = tmp_path / "straight"
    run_training(from_dict(RunConfig, config), straight)

    for part in ("model/model.safetensors", "state/weights.safetensors"):  # EMA weights and trained weights
        killed_weights, straight_weights = (
            load_file(list_checkpoints(run / "dalle")[-1][1] / part) for run in (killed, straight)
        )
        assert killed_weights.keys() == straight_weights.keys()
        for name, tensor in straight_weights.items():
            assert torch.equal(tensor, killed_weights[name]), (part, name)
    # The resumed run rewrote the metrics after its checkpoint, so the log reads like one uninterrupted run.
    assert step_losses(killed / "dalle" / "metrics.jsonl") == step_losses(straight / "dalle" / "metrics.jsonl")
    assert [step for step, _ in list_checkpoints(killed / "dalle")] == [39, 40]
