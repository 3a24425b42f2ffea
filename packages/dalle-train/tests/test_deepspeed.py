"""DeepSpeed ZeRO with real DeepSpeed: two torchrun processes over gloo on CPU against one plain process.

ZeRO 1, 2 and 3 with two processes x 4 samples (or 2 x 2 x 2 micro-batches with accumulation) average the same
gradients as one process with the whole batch of 8, clip them at the same norm (``optimizer.grad_clip``) and step the
same AdamW, so losses and weights agree up to float reduction order. Tolerance: 2e-5 absolute on every logged loss
and every trained and EMA weight after 8 steps, and 2e-5 relative on every logged gradient norm (measured: at most
4.8e-7 on the losses, 1.2e-7 on the norms and 1.2e-7 on the weights). The gradient norm is what catches a wrong
gradient scale (AdamW's update barely depends on it). Checkpoints cross backends both ways: DeepSpeed resumes a
single-process checkpoint and one process resumes a DeepSpeed ZeRO-3 checkpoint, each ending on the uninterrupted
run's weights.

The in-process tests run DeepSpeed as one process without a launcher (the backend fills in the rendezvous variables).
DeepSpeed's shared-memory comm op is never compiled (see ``_skip_shared_memory_op``), so no test waits for a C++ build.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_metrics, step_losses, tiny_dalle_run
from distributed_runs import RENDEZVOUS, TOLERANCE, copy_checkpoint, resume_in_one_process, torchrun
from safetensors.torch import load_file
from torch import nn

from dalle_core.checkpoint import load_weights
from dalle_core.config import from_dict
from dalle_core.errors import ConfigError, MissingExtraError
from dalle_train.backends import make_backend
from dalle_train.backends.base import LoopSettings, StepResult
from dalle_train.backends.deepspeed_config import engine_config, zero_stage
from dalle_train.checkpoints import list_checkpoints, read_run_info
from dalle_train.config import LoopConfig, OptimizerConfig
from dalle_train.optim import build_adamw
from dalle_train.run import run_training
from dalle_train.run_config import BackendConfig, RunConfig

# ------------------------------------------------------------------------------------------------------ helpers


def deepspeed_run(assets, stage: int | None, **loop) -> dict:
    config = tiny_dalle_run(assets, backend="deepspeed", **loop)
    if stage is not None:
        config["backend"]["deepspeed_zero_stage"] = stage
    return config


def trained(run: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    checkpoints = dict(list_checkpoints(run / "dalle"))
    return load_file(checkpoints[step or max(checkpoints)] / "state" / "weights.safetensors")


def exported(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(list_checkpoints(run / "dalle")[-1][1] / "model")[1]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def logged(run: Path) -> dict[int, tuple[float, float]]:
    """Loss and gradient norm (before clipping) of every logged step."""
    records = read_metrics(run / "dalle" / "metrics.jsonl")
    return {record["step"]: (record["loss"], record["grad_norm"]) for record in records if "loss" in record}


def curve_differences(run: Path, reference: dict[int, tuple[float, float]]) -> tuple[float, float]:
    """The largest loss difference and the largest gradient-norm difference relative to the reference's."""
    steps = logged(run)
    assert steps and set(steps) <= set(reference), (steps, reference)
    losses = [abs(loss - reference[step][0]) for step, (loss, _) in steps.items()]
    norms = [abs(norm - reference[step][1]) / reference[step][1] for step, (_, norm) in steps.items()]
    return max(losses), max(norms)


# ------------------------------------------------------------------------------------------------ two processes


def test_zero_stages_match_one_process_and_resume_across_backends(tmp_path, token_assets):
    pytest.importorskip("deepspeed")
    single = tmp_path / "single"
    run_training(from_dict(RunConfig, tiny_dalle_run(token_assets, ema_decay=0.9)), single)
    reference = logged(single)
    assert sorted(reference) == list(range(1, 9))
    single_trained, single_ema = trained(single), exported(single)
    curve_gaps, weight_gaps = [], []

    # ZeRO-1 from scratch, with EMA, its stage and a bucket size from a user JSON merged with the run config.
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 500000}}))
    zero1 = tmp_path / "zero1"
    config = deepspeed_run(token_assets, None, ema_decay=0.9)
    config["backend"]["deepspeed_config"] = str(user_json)
    torchrun(config, zero1, tmp_path, "zero1")
    assert sorted(step_losses(zero1 / "dalle" / "metrics.jsonl")) == list(range(1, 9))
    curve_gaps.append(curve_differences(zero1, reference))
    weight_gaps += [max_difference(trained(zero1), single_trained), max_difference(exported(zero1), single_ema)]

    # ZeRO-2 from scratch with EMA and 2 micro-batches of 2 per process and step.
    zero2 = tmp_path / "zero2"
    torchrun(deepspeed_run(token_assets, 2, ema_decay=0.9, grad_accum_steps=2), zero2, tmp_path, "zero2")
    curve_gaps.append(curve_differences(zero2, reference))
    weight_gaps += [max_difference(trained(zero2), single_trained), max_difference(exported(zero2), single_ema)]

    # ZeRO-3 (parameters partitioned) resumes the single process's step-4 checkpoint, optimizer state included.
    zero3 = tmp_path / "zero3"
    copy_checkpoint(single, 4, zero3)
    torchrun(deepspeed_run(token_assets, 3), zero3, tmp_path, "zero3")
    assert sorted(step_losses(zero3 / "dalle" / "metrics.jsonl")) == [5, 6, 7, 8]
    curve_gaps.append(curve_differences(zero3, reference))
    weight_gaps += [max_difference(trained(zero3), single_trained), max_difference(exported(zero3), single_trained)]
    info = read_run_info(list_checkpoints(zero3 / "dalle")[-1][1])
    assert info["backend"] == "deepspeed" and info["world_size"] == 2
    assert (zero3 / "model" / "model.safetensors").is_file()  # ZeRO-3 shards gathered into a generation bundle

    # One plain process resumes the ZeRO-3 run's step-6 checkpoint.
    again = tmp_path / "again"
    resume_in_one_process(zero3, 6, again, token_assets)
    curve_gaps.append(curve_differences(again, reference))
    weight_gaps.append(max_difference(trained(again), single_trained))

    loss_gap, norm_gap = (max(gaps) for gaps in zip(*curve_gaps, strict=True))
    print(f"max differences: loss {loss_gap:.1e}, relative grad norm {norm_gap:.1e}, weights {max(weight_gaps):.1e}")
    assert loss_gap < TOLERANCE and norm_gap < TOLERANCE and max(weight_gaps) < TOLERANCE, (curve_gaps, weight_gaps)


# ------------------------------------------------------------------------------------------------ one process


@pytest.fixture
def no_launcher(monkeypatch):
    """A process nobody launched: no rendezvous variables (the backend sets and later removes its own)."""
    for variable in RENDEZVOUS:
        monkeypatch.delenv(variable, raising=False)


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 1))


def toy_steps(backend, model, optimizer, data, poisoned: int | None) -> list[StepResult]:
    """Optimizer steps of 2 micro-batches each with a warming-up learning rate; NaN inputs at step ``poisoned``."""
    results = []
    for step, (inputs, targets) in enumerate(data):
        for group in optimizer.param_groups:
            group["lr"] = 0.05 * (step + 1) / len(data)
        for micro in range(2):
            with backend.no_sync(model) if micro == 0 else torch.enable_grad():
                x = inputs[micro * 4 : (micro + 1) * 4] * (float("nan") if step == poisoned else 1.0)
                loss = (model(x) - targets[micro * 4 : (micro + 1) * 4]).pow(2).mean()
                backend.backward(loss / 2, None)
        results.append(backend.step(model, optimizer, None, 0.5))
    return results


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_process_skips_non_finite_steps_and_checkpoints_in_the_neutral_format(stage, tmp_path, no_launcher):
    pytest.importorskip("deepspeed")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from dalle_train.backends.state_files import read_full_state

    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 5, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(4)]
    optimizer_config = OptimizerConfig(lr=0.05, weight_decay=0.1, grad_clip=0.5)
    backend = make_backend(BackendConfig(kind="deepspeed", device="cpu", deepspeed_zero_stage=stage))
    try:
        assert (backend.rank, backend.world_size, os.environ["WORLD_SIZE"]) == (0, 1, "1")
        backend.configure_loop(
            LoopSettings.of("toy", LoopConfig(batch_size=8, grad_accum_steps=2), optimizer_config, 1)
        )
        model, optimizer = backend.prepare(toy_model(), lambda m: build_adamw(m, optimizer_config))
        results = toy_steps(backend, model, optimizer, data, poisoned=2)
        assert [result.applied for result in results] == [True, True, False, True]
        assert not math.isfinite(results[2].grad_norm)
        backend.save(tmp_path / "state", model, optimizer)
        weights = backend.full_state_dict(model)

        # The same run with plain AdamW, the poisoned step left out: what "skipped" must mean.
        reference = toy_model()
        reference_optimizer = build_adamw(reference, optimizer_config)
        for step, (inputs, targets) in enumerate(data):
            if step == 2:
                continue
            for group in reference_optimizer.param_groups:
                group["lr"] = 0.05 * (step + 1) / len(data)
            (reference(inputs) - targets).pow(2).mean().backward()
            norm = float(nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
            assert abs(results[step].grad_norm - norm) < 1e-5 * norm, (step, results[step].grad_norm, norm)
            reference_optimizer.step()
            reference_optimizer.zero_grad()
        expected = get_optimizer_state_dict(reference, reference_optimizer)
        saved_weights, saved_optimizer = read_full_state(tmp_path / "state")
        assert max_difference(weights, reference.state_dict()) < 1e-6
        assert max_difference(saved_weights, reference.state_dict()) < 1e-6
        assert saved_optimizer["state"].keys() == expected["state"].keys()
        for name, entry in expected["state"].items():
            assert max_difference(saved_optimizer["state"][name], entry) < 1e-6, name
        assert [group["params"] for group in saved_optimizer["param_groups"]] == [
            group["params"] for group in expected["param_groups"]
        ]

        # A fresh engine resumes the state (weights, moments, step count) and continues like the reference.
        model, optimizer = backend.prepare(toy_model(), lambda m: build_adamw(m, optimizer_config))
        backend.load(tmp_path / "state", model, optimizer)
        assert [result.applied for result in toy_steps(backend, model, optimizer, data[:1], poisoned=None)] == [True]
        for group in reference_optimizer.param_groups:
            group["lr"] = 0.05 / 1
        (reference(data[0][0]) - data[0][1]).pow(2).mean().backward()
        nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        reference_optimizer.step()
        assert max_difference(backend.full_state_dict(model), reference.state_dict()) < 1e-6
    finally:
        backend.close()
    assert not any(variable in os.environ for variable in RENDEZVOUS)
    assert not torch.distributed.is_initialized()


def test_one_unlaunched_process_trains_bf16_like_the_single_backend(tmp_path, token_assets, no_launcher):
    """What ``dalle train --set backend.kind=deepspeed`` does without torchrun; bf16 runs as torch autocast."""
    pytest.importorskip("deepspeed")
    runs = {}
    for kind in ("single", "deepspeed"):
        config = tiny_dalle_run(token_assets, steps=4, backend=kind, precision="bf16", ema_decay=0.5)
        run_training(from_dict(RunConfig, config), tmp_path / kind)
        runs[kind] = logged(tmp_path / kind)
    assert sorted(runs["deepspeed"]) == [1, 2, 3, 4]
    assert max(curve_differences(tmp_path / "deepspeed", runs["single"])) < 1e-5
    assert max_difference(exported(tmp_path / "deepspeed"), exported(tmp_path / "single")) < 1e-5
    assert not any(variable in os.environ for variable in RENDEZVOUS)
    assert not torch.distributed.is_initialized()


def test_a_contradicting_user_json_stops_the_run_before_any_work(tmp_path, token_assets, no_launcher):
    pytest.importorskip("deepspeed")
    user_json = tmp_path / "ds.json"
    user_json.write_text(json.dumps({"gradient_clipping": 1.0, "steps_per_print": 100}))
    config = tiny_dalle_run(token_assets, backend="deepspeed")
    config["backend"]["deepspeed_config"] = str(user_json)
    config["dalle"]["optimizer"]["grad_clip"] = 0.5
    with pytest.raises(ConfigError, match=r"gradient_clipping=1.0 contradicts dalle.optimizer.grad_clip=0.5"):
        run_training(from_dict(RunConfig, config), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not torch.distributed.is_initialized()


# ------------------------------------------------------------------------------------------ config (no DeepSpeed)


def settings(**changes) -> LoopSettings:
    loop = {"batch_size": 8, "grad_accum_steps": 2, "precision": "fp32", **changes.pop("loop", {})}
    return LoopSettings.of("dalle", LoopConfig(**loop), OptimizerConfig(**changes), world_size=2)


def test_the_run_config_fills_in_the_deepspeed_config_and_user_values_pass_through():
    user = {"zero_optimization": {"stage": 3, "overlap_comm": False}, "steps_per_print": 50, "gradient_clipping": 1}
    merged = engine_config(settings(grad_clip=1.0), 2, zero_stage(None, user, "ds.json"), user, "ds.json")
    assert merged == {
        "zero_optimization": {"stage": 3, "overlap_comm": False},
        "steps_per_print": 50,
        "gradient_clipping": 1,
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "torch_autocast": {"enabled": False},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "managed_gradient_accumulation": True,
    }
    assert "train_batch_size" not in user  # the caller's dict is left as it was
    bf16 = engine_config(settings(loop={"precision": "bf16"}), 2, 2, {}, None)
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and bf16["zero_optimization"] == {
        "stage": 2
    }
    assert zero_stage(None, {}, None) == 2 and zero_stage(1, {}, None) == 1


@pytest.mark.parametrize(
    ("user", "stage", "message"),
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            2,
            r"train_micro_batch_size_per_gpu=4 contradicts dalle.loop.batch_size / \(world size 2 x "
            r"dalle.loop.grad_accum_steps\) = 2",
        ),
        (
            {"gradient_accumulation_steps": 1},
            2,
            r"gradient_accumulation_steps=1 contradicts dalle.loop.grad_accum_steps=2",
        ),
        ({"gradient_clipping": 1.0}, 2, r"gradient_clipping=1.0 contradicts dalle.optimizer.grad_clip=0.0"),
        ({"bf16": {"enabled": True}}, 2, r"bf16.enabled=true contradicts dalle.loop.precision=fp32"),
        (
            {"torch_autocast": {"enabled": True}},
            2,
            r"torch_autocast.enabled=true contradicts dalle.loop.precision=fp32",
        ),
        (
            {"zero_optimization": {"stage": 1}},
            3,
            r"zero_optimization.stage=1 contradicts backend.deepspeed_zero_stage=3",
        ),
        ({"optimizer": {"type": "Adam"}}, 2, r"remove 'optimizer'; it is set by dalle.optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, 2, r"remove 'scheduler'; it is set by dalle.optimizer.schedule"),
    ],
)
def test_a_user_value_that_contradicts_the_run_config_is_one_line_naming_both(user, stage, message):
    with pytest.raises(ConfigError, match=r"^backend.deepspeed_config ds.json: " + message) as error:
        engine_config(settings(grad_clip=0.0), 2, zero_stage(stage, user, "ds.json"), user, "ds.json")
    assert "\n" not in str(error.value)


def test_fp16_and_ema_under_zero3_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match=r"^dalle.loop.precision=fp16: backend.kind=deepspeed trains in fp32 or bf16"):
        engine_config(settings(loop={"precision": "fp16"}), 2, 2, {}, None)
    with pytest.raises(ConfigError, match=r"^dalle.loop.ema_decay > 0 averages whole parameters, but ZeRO stage 3"):
        engine_config(settings(loop={"ema_decay": 0.9}), 2, 3, {}, None)
    assert engine_config(settings(loop={"ema_decay": 0.9}), 2, 2, {}, None)["zero_optimization"] == {"stage": 2}


def test_a_missing_or_broken_user_json_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^backend.deepspeed_config: expected a DeepSpeed JSON file, found nothing"):
        make_backend(BackendConfig(kind="deepspeed", deepspeed_config=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(ConfigError, match=r"^backend.deepspeed_config: .*bad.json is not valid JSON"):
        make_backend(BackendConfig(kind="deepspeed", deepspeed_config=str(tmp_path / "bad.json")))


def test_without_the_extra_the_error_names_the_install_command(monkeypatch, no_launcher):
    # Blocks the import the way an absent package fails (ModuleNotFoundError), whether or not it is installed here.
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(MissingExtraError, match=r"uv pip install 'dalle-train\[deepspeed\]'"):
        make_backend(BackendConfig(kind="deepspeed", device="cpu"))
    assert not any(variable in os.environ for variable in RENDEZVOUS)  # the rendezvous defaults were taken back
