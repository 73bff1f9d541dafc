"""Save/load a Network as ``model.json`` (architecture) + ``model.npz`` (weights), never pickle.

A model directory may come from anywhere (a shared drive, an older run), so loading trusts
nothing: the JSON must name only known layer types with valid configs, the rebuilt network's
parameter shapes must equal both what the JSON declares and what the npz holds, and the npz is
read with allow_pickle=False so it cannot run code.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .layers import LAYER_TYPES
from .network import Network

FORMAT = "cxr.nn"
VERSION = 1
ARCH_FILE = "model.json"
WEIGHTS_FILE = "model.npz"
_DTYPES = ("float32", "float64")


class ModelFormatError(ValueError):
    """A model directory that cannot be loaded as saved by cxr.nn.io.save."""


def architecture(network: Network, metadata: dict | None = None) -> dict:
    network._ensure_built()
    return {
        "format": FORMAT,
        "version": VERSION,
        "input_shape": list(network.input_shape),
        "dtype": network.dtype.name,
        "layers": [
            {"type": type(layer).__name__, "config": layer.get_config(),
             "weights": {k: list(v) for k, v in layer.param_shapes().items()}}
            for layer in network.layers
        ],
        "metadata": metadata or {},
    }


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(network: Network, directory, metadata: dict | None = None) -> Path:
    """Write model.json + model.npz into ``directory`` (created if needed); returns the directory.

    metadata: JSON-serialisable extras (class names, preprocessing, training run) kept with the model.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arch = architecture(network, metadata)
    json.dumps(arch)  # fail before writing anything if metadata is not JSON-serialisable
    weights = {key: np.ascontiguousarray(p) for key, p, _ in network.parameters()}
    _atomic_write(d / WEIGHTS_FILE, lambda f: np.savez(f, **weights))
    _atomic_write(d / ARCH_FILE, lambda f: f.write((json.dumps(arch, indent=1) + "\n").encode()))
    return d


def _fail(path, msg):
    raise ModelFormatError(f"{path}: {msg}")


def _shape(value, where, path):
    if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                               for s in value):
        _fail(path, f"{where} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _network_from_architecture(arch, path) -> Network:
    if not isinstance(arch, dict):
        _fail(path, "top level must be a JSON object")
    if arch.get("format") != FORMAT:
        _fail(path, f"not a cxr.nn model (format={arch.get('format')!r}, expected {FORMAT!r})")
    if arch.get("version") != VERSION:
        _fail(path, f"unsupported version {arch.get('version')!r} (this code reads version {VERSION})")
    if arch.get("dtype") not in _DTYPES:
        _fail(path, f"dtype must be one of {_DTYPES}, got {arch.get('dtype')!r}")
    input_shape = _shape(arch.get("input_shape"), "input_shape", path)
    specs = arch.get("layers")
    if not isinstance(specs, list) or not specs:
        _fail(path, "'layers' must be a non-empty list")
    net = Network(input_shape=input_shape, seed=0, dtype=arch["dtype"])
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            _fail(path, f"layers[{i}] must be an object")
        kind = spec.get("type")
        if kind not in LAYER_TYPES:
            _fail(path, f"layers[{i}] has unknown layer type {kind!r}; known types: {', '.join(sorted(LAYER_TYPES))}")
        config = spec.get("config", {})
        if not isinstance(config, dict):
            _fail(path, f"layers[{i}] ({kind}) config must be an object")
        try:
            net.add_layer(LAYER_TYPES[kind].from_config(config))
        except (TypeError, ValueError) as e:
            _fail(path, f"layers[{i}] ({kind}) has an invalid config {config!r}: {e}")
    try:
        net.build()
    except ValueError as e:
        _fail(path, f"the layers do not fit together: {e}")
    for i, (spec, layer) in enumerate(zip(specs, net.layers)):
        declared = spec.get("weights", {})
        if not isinstance(declared, dict):
            _fail(path, f"layers[{i}] weights must be an object")
        declared = {k: _shape(v, f"layers[{i}].weights.{k}", path) for k, v in declared.items()}
        if declared != layer.param_shapes():
            _fail(path, f"layers[{i}] ({spec['type']}) declares weights {declared}, "
                        f"but its config gives {layer.param_shapes()}")
    return net


def load(directory) -> Network:
    """Rebuild the Network saved in ``directory``; raises ModelFormatError on anything inconsistent."""
    d = Path(directory)
    arch_path, weights_path = d / ARCH_FILE, d / WEIGHTS_FILE
    for p in (arch_path, weights_path):
        if not p.is_file():
            raise ModelFormatError(f"{p}: missing (a model directory holds {ARCH_FILE} and {WEIGHTS_FILE})")
    try:
        arch = json.loads(arch_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{arch_path}: not valid JSON: {e}") from None
    net = _network_from_architecture(arch, arch_path)
    net.metadata = arch.get("metadata", {})
    expected = {key: p for key, p, _ in net.parameters()}
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            stored = set(npz.files)
            if stored != set(expected):
                missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
                _fail(weights_path, f"weights do not match the architecture (missing {missing}, unexpected {extra})")
            for key, param in expected.items():
                arr = npz[key]
                if arr.shape != param.shape:
                    _fail(weights_path, f"{key} has shape {arr.shape}, architecture needs {param.shape}")
                if arr.dtype.kind != "f":
                    _fail(weights_path, f"{key} has dtype {arr.dtype}, expected floating point")
                if not np.all(np.isfinite(arr)):
                    _fail(weights_path, f"{key} contains NaN or infinite values")
                param[...] = arr
    except ModelFormatError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # object arrays (pickle), truncated or non-zip files
        raise ModelFormatError(f"{weights_path}: cannot read weights: {e}") from None
    return net
