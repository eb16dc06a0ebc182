"""Config helpers shared by the Snakefile and the library: model layers, input files, checks.

The JSON schema (workflow/schemas/config.schema.yaml) checks shapes and types; this module checks
what the schema cannot: files exist, a local model directory is complete, layers are in range.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

DATASET_FILE_KEYS = {
    "phase2": ("scores", "responses"),
    "facts": ("path",),
    "labelled": ("path",),
    "task_grid": (),
}
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "special_tokens_map.json")


def is_local_model(source: str, base_dir: str | Path = ".") -> bool:
    """A source is a local directory if it exists or looks like a path; otherwise a hub id."""
    path = Path(base_dir) / source
    return path.is_dir() or source.startswith((".", "/", "~")) or source.count("/") > 1


def model_files(source: str, base_dir: str | Path = ".") -> list[str]:
    """Files of a local model directory that the cached activations depend on (sorted)."""
    if not is_local_model(source, base_dir):
        return []
    root = Path(base_dir) / source
    files = {root / "config.json"}
    for pattern in _WEIGHT_GLOBS:
        files.update(root.glob(pattern))
    files.update(p for p in (root / name for name in _TOKENIZER_FILES) if p.exists())
    return sorted(str(Path(source) / p.relative_to(root)) for p in files)


def read_n_layers(source: str, base_dir: str | Path = ".") -> int | None:
    """Number of transformer blocks from a local model's config.json (None for hub ids)."""
    if not is_local_model(source, base_dir):
        return None
    cfg_path = Path(base_dir) / source / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    text_cfg = cfg.get("text_config") or {}
    return text_cfg.get("num_hidden_layers")


def resolve_layers(name: str, model: dict[str, Any], base_dir: str | Path = ".") -> list[int]:
    """The sorted layer list of a model, with "all" expanded and every index range-checked."""
    n_layers = model.get("n_layers") or read_n_layers(model["source"], base_dir)
    layers = model.get("layers", "all")
    if layers == "all":
        if n_layers is None:
            raise ConfigError(
                f"models.{name}.layers",
                f"'all' needs the layer count of hub model '{model['source']}': "
                "give a list of layers or set n_layers",
            )
        return list(range(n_layers))
    layers = sorted(int(layer) for layer in layers)
    if n_layers is not None:
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise ConfigError(
                f"models.{name}.layers",
                f"layer(s) {bad} out of range: model '{model['source']}' has {n_layers} layers (0-{n_layers - 1})",
            )
    return layers


def dataset_files(spec: dict[str, Any]) -> list[str]:
    return [spec[key] for key in DATASET_FILE_KEYS.get(spec.get("kind"), ()) if key in spec]


def check_config(config: dict[str, Any], base_dir: str | Path = ".") -> dict[str, list[int]]:
    """Checks beyond the schema; returns {model name: resolved layers}. Raises ConfigError."""
    base = Path(base_dir)
    for name, spec in config["datasets"].items():
        for key in DATASET_FILE_KEYS.get(spec["kind"], ()):
            if key in spec and not (base / spec[key]).is_file():
                raise ConfigError(f"datasets.{name}.{key}", f"file not found: {spec[key]}")
    layers = {}
    for name, model in config["models"].items():
        source = model["source"]
        if is_local_model(source, base):
            root = base / source
            if not root.is_dir():
                raise ConfigError(f"models.{name}.source", f"model directory not found: {source}")
            if not (root / "config.json").is_file():
                raise ConfigError(f"models.{name}.source", f"{source} has no config.json (not a save_pretrained directory)")
            if not any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
                raise ConfigError(f"models.{name}.source", f"{source} has no tokenizer files (tokenizer.json/tokenizer_config.json)")
        layers[name] = resolve_layers(name, model, base)
        for layer in config.get("activations", {}).get("token_level_layers", []):
            if layer not in layers[name]:
                raise ConfigError(
                    "activations.token_level_layers",
                    f"layer {layer} is not among the layers of model '{name}' ({layers[name]})",
                )
    for name, exp in config.get("patching", {}).get("experiments", {}).items():
        if not (base / exp["pairs"]).is_file():
            raise ConfigError(f"patching.experiments.{name}.pairs", f"file not found: {exp['pairs']}")
    has_grid = any(spec["kind"] == "task_grid" for spec in config["datasets"].values())
    act = config.get("activations", {})
    tv = config.get("task_vectors", {})
    if has_grid and tv.get("pooling", "last") not in act.get("poolings", ["mean", "last"]):
        raise ConfigError("task_vectors.pooling", f"'{tv.get('pooling', 'last')}' is not cached: add it to activations.poolings")
    if has_grid and tv.get("component") and tv["component"] not in act.get("components", ["resid_post"]):
        raise ConfigError("task_vectors.component", f"'{tv['component']}' is not cached: add it to activations.components")
    for group, members in config.get("probes", {}).get("generalization", {}).items():
        unknown = [d for d in members if d not in config["datasets"]]
        if unknown:
            raise ConfigError(f"probes.generalization.{group}", f"unknown dataset(s) {unknown}")
    return layers
