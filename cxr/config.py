"""Configuration: conf/default.yaml, then an optional profile file, then command-line flags.

One loader so that every job resolves settings the same way and records exactly what it used.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
DEFAULT_CONF = CONF_DIR / "default.yaml"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts merge key by key; any other value in `override` replaces the base one."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(profile: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults <- profile file <- overrides (dotted keys, e.g. {"preprocess.size": 128}; None values ignored)."""
    config = _read_yaml(DEFAULT_CONF)
    if profile:
        path = Path(profile)
        if not path.exists() and not path.suffix:
            path = CONF_DIR / f"{profile}.yaml"
        config = deep_merge(config, _read_yaml(path))
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config
