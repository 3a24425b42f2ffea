"""The shared loop's features: decay groups, schedules, EMA, accumulation, precision, NaN skipping, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, step_losses, tiny_dalle_run
from safetensors.torch import load_file, save_file
from torch import nn
from torch._dynamo.utils import counters

from dalle_core.config import from_dict
from dalle_core.errors import CheckpointError, ConfigError
from dalle_train.backends import SingleBackend
from dalle_train.checkpoints import checkpoints_dir, list_checkpoints, read_run_info
from dalle_train.config import LoopConfig, OptimizerConfig
from dalle_train.datasets.samples import SkipUnreadable
from dalle_train.datasets.streams import MapBatchStream
from dalle_train.ema import EMA
from dalle_train.loop import NonFiniteTrainingError, StepContext, train_loop
from dalle_train.optim import build_adamw, decay_groups
from dalle_train.run import run_training
from dalle_train.run_config import LoggingConfig, RunConfig
from dalle_train.run_logger import RunLogger
from dalle_train.schedules import PlateauState, learning_rate


def run(config: dict, output: Path):
    return run_training(from_dict(RunConfig, config), output)


def final_state(output: Path, part: str = "state/weights.safetensors") -> dict[str, torch.Tensor]:
    return load_file(list_checkpoints(output / "dalle")[-1][1] / part)


# ------------------------------------------------------------------------------------------------ optimizer groups


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.gain = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_weight_decay_only_for_matrices_and_kernels():
    decay, no_decay = decay_groups(Toy())
    assert decay == ["proj.weight", "conv.weight"]
    assert no_decay == ["gain", "embed.weight", "proj.bias", "norm.weight", "norm.bias", "conv.bias"]
    optimizer = build_adamw(Toy(), OptimizerConfig(lr=0.1, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-6))
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer.param_groups] == [(2, 0.3), (6, 0.0)]
    assert optimizer.defaults["betas"] == (0.8, 0.9) and optimizer.defaults["eps"] == 1e-6


# -------------------------------------------------------------------------------------------------------- schedules


def test_constant_and_plateau_schedules():
    config = OptimizerConfig(
        lr=1.0,
        warmup_steps=2,
        schedule="plateau",
        plateau_factor=0.5,
        plateau_patience=2,
        min_lr_ratio=0.2,
        plateau_threshold=0.0,
    )
    assert learning_rate(0, 10, config, 0.25) == 0.5  # warmup ignores the plateau scale
    assert learning_rate(5, 10, config, 0.25) == 0.25
    assert learning_rate(5, 10, OptimizerConfig(lr=2.0, schedule="constant")) == 2.0
    plateau = PlateauState()
    observed = [plateau.observe(loss, config) or plateau.scale for loss in (3.0, 2.0, 2.5, 2.1, 2.0, 2.2, 9, 9, 9, 9)]
    # improvement, improvement, bad, bad -> 0.5, bad, bad -> 0.25, bad, bad -> floor 0.2, bad, bad -> stays 0.2
    assert [plateau_scale for plateau_scale in observed] == [1.0, 1.0, 1.0, True, 0.5, True, 0.25, True, 0.2, 0.2]
    copy = PlateauState()
    copy.load_state_dict(plateau.state_dict())
    assert copy == plateau


# ------------------------------------------------------------------------------------------------------------- EMA


def test_ema_follows_its_formula():
    model = nn.Linear(2, 1)
    ema = EMA(model, decay=0.9)
    history = [model.weight.detach().clone()]
    expected = model.weight.detach().clone()
    for update in range(12):
        with torch.no_grad():
            model.weight.add_(1.0)
        decay = min(0.9, (1 + update) / (10 + update))
        expected = decay * expected + (1 - decay) * model.weight.detach()
        ema.update(model)
        history.append(expected)
    assert torch.allclose(ema.full_state_dict(model)["weight"], expected)
    other = EMA(model, decay=0.9)
    other.load_full_state_dict(ema.full_state_dict(model), ema.updates)
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.updates == 12


# ------------------------------------------------------------------------------------------ accumulation, precision


def test_gradient_accumulation_matches_the_full_batch(tmp_path, token_assets):
    run(tiny_dalle_run(token_assets, steps=4), tmp_path / "full")
    run(tiny_dalle_run(token_assets, steps=4, grad_accum_steps=4), tmp_path / "accumulated")
    full, accumulated = final_state(tmp_path / "full"), final_state(tmp_path / "accumulated")
    for name in full:
        assert torch.allclose(full[name], accumulated[name], atol=2e-5, rtol=0), name
    a, b = (
        step_losses(tmp_path / "full" / "dalle" / "metrics.jsonl"),
        step_losses(tmp_path / "accumulated" / "dalle" / "metrics.jsonl"),
    )
    assert max(abs(a[s] - b[s]) for s in a) < 2e-5


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, token_assets):
    """``loop.compile``: the same losses and weights as eager training (float rounding of fused kernels), and
    checkpoints under the plain model's parameter names, so eager runs resume them."""
    run(tiny_dalle_run(token_assets, steps=2), tmp_path / "eager")
    counters.clear()
    run(tiny_dalle_run(token_assets, steps=2, compile=True), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0  # it did go through torch.compile
    # The input checks read their verdict on the host outside the compiled graphs (torch.compiler.disable), not as a
    # warned graph break; nothing else breaks the graphs.
    unexpected = [reason for reason in counters["graph_break"] if "torch.compiler.disable" not in reason]
    assert not unexpected, unexpected
    eager, compiled = final_state(tmp_path / "eager"), final_state(tmp_path / "compiled")
    assert eager.keys() == compiled.keys()
    for name in eager:
        assert torch.allclose(eager[name], compiled[name], atol=1e-5, rtol=0), name
    a, b = (step_losses(tmp_path / name / "dalle" / "metrics.jsonl") for name in ("eager", "compiled"))
    assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a) < 1e-5
    run(tiny_dalle_run(token_assets, steps=3), tmp_path / "compiled")  # resumed eagerly
    assert list_checkpoints(tmp_path / "compiled" / "dalle")[-1][0] == 3


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused_before_any_work(tmp_path, token_assets):
    run(tiny_dalle_run(token_assets, steps=3, precision="bf16", ema_decay=0.5), tmp_path / "bf16")
    records = read_metrics(tmp_path / "bf16" / "dalle" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    # With EMA on, the exported model holds the averages, the training state the trained weights.
    assert not torch.equal(
        final_state(tmp_path / "bf16", "model/model.safetensors")["bos"], final_state(tmp_path / "bf16")["bos"]
    )
    with pytest.raises(ConfigError, match=r"^dalle.loop.precision=fp16 needs a CUDA device"):
        run(tiny_dalle_run(token_assets, precision="fp16"), tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()


# --------------------------------------------------------------------------------------------- non-finite steps


class LinearTask:
    """A regression task whose loss is NaN at the steps in ``poisoned``: a real model, a controlled failure."""

    name = "toy"

    def __init__(self, poisoned: set[int]) -> None:
        self.poisoned = poisoned

    def build_model(self) -> nn.Module:
        return nn.Linear(3, 1)

    def loss(self, model, batch, context: StepContext):
        x = batch["images"].flatten(1)[:, :3]
        loss = (model(x) - 1.0).pow(2).mean()
        if context.step in self.poisoned:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}

    def tokens(self, batch) -> int:
        return len(batch["images"])

    def scalars(self, step, total_steps):
        return {}

    def signature(self):
        return {"toy": 1}

    def write_export(self, directory: Path, state) -> None:
        directory.mkdir(parents=True)
        save_file(state, str(directory / "weights.safetensors"))

    def read_export(self, directory: Path) -> nn.Module:
        model = self.build_model()
        model.load_state_dict(load_file(str(directory / "weights.safetensors")))
        return model.eval()

    def sample(self, model, path, device):
        return {}


def toy_run(
    tmp_path: Path, poisoned: set[int], steps: int = 6, optimizer: OptimizerConfig | None = None, **loop
) -> nn.Module:
    from conftest import TinyImages

    backend = SingleBackend("cpu")
    stream = MapBatchStream(SkipUnreadable(TinyImages(8)), 4, 0, 1, seed=0)
    loop = {"sample_every": 100, **loop}
    config = LoopConfig(steps=steps, batch_size=4, log_every=1, checkpoint_every=1, keep_last=10, **loop)
    logger = RunLogger(tmp_path, LoggingConfig(progress=False))
    optimizer = optimizer or OptimizerConfig(lr=0.1)
    return train_loop(LinearTask(poisoned), stream, config, optimizer, backend, logger, tmp_path)


def test_a_nan_step_is_skipped_reported_and_training_goes_on(tmp_path, capsys):
    model = toy_run(tmp_path / "nan", poisoned={2})
    records = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in records[2]  # the skipped step contributes no loss to the log window
    assert all(math.isfinite(p) for p in model.weight.flatten().tolist())
    assert "toy step 3: non-finite loss or gradients" in capsys.readouterr().err
    # Skipping leaves the weights as they were: step 3 changed nothing, steps 2 and 4 did.
    states = {
        step: load_file(path / "state" / "weights.safetensors") for step, path in list_checkpoints(tmp_path / "nan")
    }
    assert torch.equal(states[2]["weight"], states[3]["weight"])
    assert not torch.equal(states[1]["weight"], states[2]["weight"])
    assert not torch.equal(states[3]["weight"], states[4]["weight"])


def test_too_many_nan_steps_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match="3 steps in a row had non-finite loss"):
        toy_run(tmp_path, poisoned={1, 2, 3, 4}, max_nonfinite_steps=3)


# ------------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_self_describing_pruned_and_checked_on_resume(tmp_path, token_assets):
    output = tmp_path / "run"
    staging = checkpoints_dir(output / "dalle") / ".step-00000002.tmp-left-by-a-kill"
    staging.mkdir(parents=True)
    run(tiny_dalle_run(token_assets, steps=6, keep_last=2), output)
    assert not staging.exists()
    assert [step for step, _ in list_checkpoints(output / "dalle")] == [4, 6]
    last = list_checkpoints(output / "dalle")[-1][1]
    info = read_run_info(last)
    assert info["stage"] == "dalle" and info["step"] == 6 and info["backend"] == "single"
    assert info["signature"]["dim"] == 32 and info["run_config"]["dalle"]["text_seq_len"] == 16
    assert sorted(p.name for p in (last / "model").iterdir()) == [
        "config.json",
        "image_tokenizer",
        "model.safetensors",
        "text_tokenizer",
        "training_config.json",
    ]
    assert sorted(p.name for p in (last / "state").iterdir()) == ["format.json", "optimizer.pt", "weights.safetensors"]

    bigger = tiny_dalle_run(token_assets, steps=8)
    bigger["dalle"]["model"]["dim"] = 48
    with pytest.raises(CheckpointError, match=r"was trained with dim=32 but the config now says 48.*--fresh"):
        run(bigger, output)
    run_training(from_dict(RunConfig, bigger), output, resume=False)  # --fresh: starts over
    assert read_run_info(list_checkpoints(output / "dalle")[-1][1])["signature"]["dim"] == 48


def test_the_plateau_schedule_lowers_the_rate_when_the_loss_stalls(tmp_path):
    # A 99% improvement is required and never happens, so from the second evaluation on every one halves the rate.
    optimizer = OptimizerConfig(lr=0.1, schedule="plateau", plateau_patience=1, plateau_threshold=0.99)
    toy_run(tmp_path, poisoned=set(), optimizer=optimizer, sample_every=1)
    rates = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if "lr" in r]
    assert rates == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125, 0.01])  # floor: lr * min_lr_ratio
