"""Config loading is strict: unknown keys and bad values are errors that say what to change."""
import json

import pytest

from moetion import Config, ConfigError
from moetion.config import LRScheduleConfig
from moetion.lr_schedule import lr_factor


def test_from_dict_builds_nested_sections():
    config = Config.from_dict({"micro_batches": 8, "lr_schedule": {"warmup_iterations": 3}})
    assert config.micro_batches == 8
    assert config.lr_schedule == LRScheduleConfig(warmup_iterations=3)


def test_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="unknown config key 'micro_batchs'"):
        Config.from_dict({"micro_batchs": 4})
    with pytest.raises(ConfigError, match="unknown config key 'lr_schedule.warmup'"):
        Config.from_dict({"lr_schedule": {"warmup": 4}})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"micro_batches": 0}, "micro_batches must be >= 1"),
        ({"precision": "fp8"}, "precision must be one of"),
        ({"grad_clip": -1.0}, "grad_clip must be > 0"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"lr_schedule": {"decay": "cosine"}}, "needs decay_iterations"),
        ({"lr_schedule": "fast"}, "must be a mapping"),
        ({"snapshot": {"window": 0}}, "snapshot.window must be >= 1"),
        ({"snapshot": {"budget_fraction": 0}}, "budget_fraction must lie in"),
        ({"snapshot": {"persist_every": 0}}, "persist_every"),
        ({"snapshot": {"widow": 3}}, "unknown config key 'snapshot.widow'"),
    ],
)
def test_bad_values(values, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(values)


def test_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"seed": 7, "precision": "bf16"}))
    assert Config.from_json(path) == Config(seed=7, precision="bf16")
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_json(tmp_path / "missing.json")


def test_lr_is_a_function_of_the_iteration():
    schedule = LRScheduleConfig(warmup_iterations=4, decay="linear", decay_iterations=10, min_ratio=0.1)
    assert [lr_factor(schedule, t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(schedule, 9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(schedule, 100) == pytest.approx(0.1)
    cosine = LRScheduleConfig(decay="cosine", decay_iterations=10)
    assert lr_factor(cosine, 0) == 1.0 and lr_factor(cosine, 5) == pytest.approx(0.5)


def test_kill_specs_parse_and_reject_nonsense():
    from moetion.faults import KillSpec

    assert KillSpec.parse("stage=2, iter=17, phase=backward") == KillSpec(2, 17, "backward")
    assert KillSpec.parse(KillSpec(1, 3, "capture", 1).to_text()) == KillSpec(1, 3, "capture", 1)
    with pytest.raises(ConfigError, match="phase must be one of"):
        KillSpec.parse("stage=1,iter=2,phase=lunch")
    with pytest.raises(ConfigError, match="needs stage="):
        KillSpec.parse("stage=1,phase=step")
    with pytest.raises(ConfigError, match="key=value"):
        KillSpec.parse("stage")
