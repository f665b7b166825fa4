"""Presets: one frozen dataclass per pipeline stage, bundled by name.

The presets themselves live in the top-level ``configs/`` folder (``configs/tiny.py``, ``configs/mini.py``,
``configs/paper.py``), each exposing ``get_config() -> Preset``. Command-line overrides are applied with
:func:`override`, which only accepts fields that exist and converts strings to the field's type.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
from typing import Any

PRESET_NAMES = ("tiny", "mini", "mini3", "paper", "gpu_short")


@dataclasses.dataclass(frozen=True)
class Preset:
    """All stage configs of one preset. Stages that are not built yet are ``None``."""

    name: str
    data: Any  # apr_jax.data.config.DataConfig
    model: Any = None  # apr_jax.model.config.LlamaConfig
    train: Any = None  # apr_jax.train.config.SFTConfig
    rl: Any = None  # apr_jax.rl.config.GRPOConfig (its kl_beta is set per method by the rl command)


def load(name: str) -> Preset:
    """Load the preset ``configs/<name>.py``."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    module = importlib.import_module(f"configs.{name}")
    preset = module.get_config()
    if not isinstance(preset, Preset):
        raise TypeError(f"configs/{name}.py get_config() returned {type(preset).__name__}, not Preset")
    return preset


def _optional(field: dataclasses.Field) -> bool:
    return "None" in str(field.type) or "Optional" in str(field.type)


def _coerce(value: Any, current: Any, field: dataclasses.Field) -> Any:
    if not isinstance(value, str):
        return value
    if value == "None" and _optional(field):  # unset an optional field (e.g. train.steps=None with epochs)
        return None
    if current is None:  # a field left unset: its annotation says what to read ("int | None", "tuple[...] | None")
        if str(field.type).replace(" ", "") in ("str|None", "Optional[str]"):
            return value
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{field.name}: expected a Python literal ({field.type}), got {value!r}") from err
    kind = type(current)
    if kind is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}: expected a boolean, got {value!r}")
    if kind in (int, float, str):
        try:
            return kind(value)
        except ValueError as err:
            raise ValueError(f"{field.name}: expected {kind.__name__}, got {value!r}") from err
    if kind is tuple:
        return tuple(type(current[0])(v) if current else v for v in value.split(","))
    raise ValueError(f"{field.name}: cannot set a {kind.__name__} field from the command line")


def override(config: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that names unknown fields and converts command-line strings."""
    fields = {f.name: f for f in dataclasses.fields(config)}
    clean = {}
    for key, value in changes.items():
        if value is None:
            continue
        if key not in fields:
            raise ValueError(
                f"{type(config).__name__} has no field {key!r}; fields: {', '.join(sorted(fields))}"
            )
        clean[key] = _coerce(value, getattr(config, key), fields[key])
    return dataclasses.replace(config, **clean)
