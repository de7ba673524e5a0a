"""YAML configuration files for ``flowforce`` commands, validated against a schema.

A schema maps each allowed top-level key to the type its value must have; unknown keys
are rejected by name (never silently ignored). Nested sections are validated by the
library objects they configure (``TrainConfig.from_dict``, ``flow_options``,
``parse_loss_weights``), which also reject unknown keys.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from openmm_flowforce.errors import FlowforceError

#: ``flowforce train --config``: top-level keys and their types.
TRAIN_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "flow": dict,          # CouplingFlow options: transform, n_layers, hidden, n_components
    "train": dict,         # TrainConfig fields: steps, batch_size, lr, ...
    "loss": (dict, str),   # {"nll": 1, "force": 0.1} or "nll=1,force=0.1"
    "epochs": (int, float),
    "val_fraction": float,
}


def load_config(path: str | Path | None, schema: Mapping[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """Read a YAML mapping and check its top-level keys and value types against ``schema``.

    Raises:
        ValueError: unreadable YAML, a non-mapping document, unknown keys (listing the
            valid ones) or values of the wrong type.
    """
    if path is None:
        return {}
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FlowforceError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FlowforceError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise FlowforceError(f"config file {path} must hold a mapping of options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise FlowforceError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(schema)}")
    for key, value in data.items():
        expected = schema[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = data[key] = float(value)
        if not isinstance(value, expected) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise FlowforceError(f"{path}: '{key}' must be a {names}, got {value!r}")
    return data
