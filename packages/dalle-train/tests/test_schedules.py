from __future__ import annotations

import math

import pytest

from dalle_core.errors import ConfigError
from dalle_train.config import OptimizerConfig
from dalle_train.schedules import gumbel_temperature, learning_rate


def test_warmup_then_cosine_matches_formula():
    config = OptimizerConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [learning_rate(s, 14, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(4, 14, config) == pytest.approx(1.0)
    assert learning_rate(13, 14, config) == pytest.approx(0.1)
    middle = 4 + (13 - 4) / 2
    assert learning_rate(int(middle), 14, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))


def test_temperature_anneals_geometrically():
    assert gumbel_temperature(0, 11, 1.0, 1 / 16) == 1.0
    assert gumbel_temperature(10, 11, 1.0, 1 / 16) == pytest.approx(1 / 16)
    assert gumbel_temperature(5, 11, 1.0, 1 / 16) == pytest.approx(0.25)


def test_bad_optimizer_values():
    with pytest.raises(ConfigError, match="optimizer.lr must be positive, got -1"):
        OptimizerConfig(lr=-1)
