"""Reading a plan's inputs: durations like ``10m`` and model/hardware descriptions in JSON."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from moetion.errors import ConfigError
from moetion.planner.cost import HardwareSpec, ModelSpec
from moetion.planner.presets import preset

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` or a bare number of seconds, as seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise ConfigError(f"cannot read duration {text!r}: use e.g. 90s, 10m, 2h")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ConfigError(f"duration must be > 0, got {text!r}")
    return seconds


def load_spec(source: str | None, *, preset_name: str | None) -> tuple[ModelSpec, HardwareSpec]:
    """A preset, a JSON description, or a preset overridden by one.

    JSON shape: ``{"model": {ModelSpec fields}, "hardware": {HardwareSpec fields}}``, either a
    file path or inline text. With a preset, only the given fields are overridden.
    """
    if source is None and preset_name is None:
        raise ConfigError("give --preset NAME, --json FILE-or-JSON, or both")
    base_model, base_hw = preset(preset_name) if preset_name else (None, None)
    if source is None:
        return base_model, base_hw
    try:
        text = Path(source).read_text() if not source.lstrip().startswith("{") else source
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise ConfigError(f"--json {source}: cannot read it ({reason}); give a file or inline JSON text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"cannot parse the JSON description: {error}") from None
    if not isinstance(data, dict) or set(data) - {"model", "hardware"}:
        raise ConfigError('the JSON description must be {"model": {...}, "hardware": {...}}')
    return (_build(ModelSpec, data.get("model", {}), base_model), _build(HardwareSpec, data.get("hardware", {}), base_hw))


def _build(cls, values: dict, base):
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s) {sorted(unknown)}; known: {sorted(known)}")
    merged = {f.name: getattr(base, f.name) for f in fields(cls)} if base is not None else {}
    merged.update(values)
    try:
        return cls(**merged)
    except TypeError as error:
        raise ConfigError(f"incomplete {cls.__name__}: {error}") from None
