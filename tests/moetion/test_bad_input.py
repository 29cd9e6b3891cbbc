"""Bad input, tried as a new user would: each is a one-line error naming the key or flag, never a
traceback, and leaves nothing behind. The CLI rows run the real ``moetion`` command in a subprocess;
all of them fail before any rank starts, so they are fast."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moetion import Config, ConfigError

# ---------------------------------------------------------------------------------------- config

CONFIG_ROWS = [
    ({"seed": "0"}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
    ({"micro_batches": 2.5}, "micro_batches", "integer"),
    ({"micro_batches": "4"}, "micro_batches", "integer"),
    ({"grad_clip": math.nan}, "grad_clip", "finite"),
    ({"grad_clip": math.inf}, "grad_clip", "finite"),
    ({"grad_clip": "1.0"}, "grad_clip", "number"),
    ({"peer_timeout_s": True}, "peer_timeout_s", "number"),
    ({"threads": 1.0}, "threads", "integer"),
    ({"precision": 16}, "precision", "string"),
    ({"snapshot": {"enabled": "false"}}, "snapshot.enabled", "boolean"),
    ({"snapshot": {"enabled": 1}}, "snapshot.enabled", "boolean"),
    ({"snapshot": {"window": "3"}}, "snapshot.window", "integer"),
    ({"snapshot": {"replicate": "no"}}, "snapshot.replicate", "boolean"),
    ({"snapshot": {"shm_dir": 5}}, "snapshot.shm_dir", "string"),
    ({"snapshot": None}, "snapshot", "mapping"),
    ({"lr_schedule": {"min_ratio": math.nan}}, "lr_schedule.min_ratio", "finite"),
    ({"lr_schedule": {"warmup_iterations": 1.5}}, "lr_schedule.warmup_iterations", "integer"),
    ({"upstream_log": {"codec": "gzip"}}, "upstream_log.codec", "'none', 'lz4', 'zstd'"),
    ({"upstream_log": {"codec": "zstd", "level": 99}}, "upstream_log.level", "expected"),
    ({"upstream_log": {"shuffle": "true"}}, "upstream_log.shuffle", "boolean"),
    ({"upstream_log": {"budget_bytes": -1}}, "upstream_log.budget_bytes", ">= 0"),
    ({"upstream_log": {"budget_bytes": 1e9}}, "upstream_log.budget_bytes", "integer"),
]


@pytest.mark.parametrize("values, key, expected", CONFIG_ROWS, ids=[r[1] + "=" + repr(r[0]) for r in CONFIG_ROWS])
def test_config_value_of_the_wrong_type_is_an_error_naming_key_value_and_type(values, key, expected):
    with pytest.raises(ConfigError) as caught:
        Config.from_dict(values)
    message = str(caught.value)
    assert key in message and expected in message and "\n" not in message, message


def test_config_values_of_the_right_type_still_load():
    config = Config.from_dict({"seed": 3, "grad_clip": 2, "snapshot": {"enabled": True, "window": None},
                               "upstream_log": {"enabled": True, "codec": "zstd", "level": 3, "budget_bytes": 0}})
    assert (config.seed, config.grad_clip, config.upstream_log.level) == (3, 2, 3)
