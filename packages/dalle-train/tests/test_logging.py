"""Metrics sinks: JSONL (with resume truncation), TensorBoard event files, and W&B kept offline."""

from __future__ import annotations

import sys
import types

import pytest
from conftest import read_metrics

from dalle_core.errors import MissingExtraError
from dalle_train.progress import MetricsLog
from dalle_train.run_config import LoggingConfig
from dalle_train.run_logger import RunLogger


def test_jsonl_resume_drops_records_past_the_checkpoint_and_torn_lines(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3, 4):
        log.write(step, loss=float(step))
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a write cut off by a kill
    log.truncate_after(2)
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 1.0), (2, 2.0)]


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = RunLogger(tmp_path, LoggingConfig(progress=False, tensorboard=True))
    logger.start("train", 10, 0, {})
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "lr": 0.1})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.333333)]
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 3


def test_wandb_is_lazy_offline_by_default_and_never_needed(tmp_path, monkeypatch):
    calls: dict = {"log": []}

    class FakeRun:  # stands in for the W&B service: the test must not reach the network
        def log(self, metrics, step):
            calls["log"].append((step, dict(metrics)))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    logger = RunLogger(tmp_path / "run", LoggingConfig(progress=False, jsonl=False, wandb=True, wandb_project="p"))
    logger.start("train", 5, 2, {"lr": 0.1})
    logger.log(3, {"loss": 0.5})
    logger.close()
    assert calls["init"]["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path / "run")
    assert calls["init"]["project"] == "p" and calls["init"]["config"] == {"lr": 0.1}
    assert calls["log"] == [(3, {"loss": 0.5})] and calls["finished"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(MissingExtraError, match=r"dalle-train\[wandb\]"):
        RunLogger(tmp_path / "other", LoggingConfig(progress=False, wandb=True)).start("train", 5, 0, {})


def test_non_main_processes_write_nothing(tmp_path):
    logger = RunLogger(tmp_path, LoggingConfig(progress=False), enabled=False)
    logger.start("train", 5, 0, {})
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()
