"""The run manifest ``results/manifest.json``: what produced the results.

It records the layerscope version and git commit, the versions of the libraries the numbers
depend on, the platform, a hash of the (validated) config, every seed in it, and per model its
source, revision and - for local directories - a hash of its config and weight files, so a
retrained local model is visible in the manifest.

Nothing in it depends on the wall clock: two runs with the same code, environment, config and
model files write byte-identical manifests (so the file can be diffed or hashed).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from layerscope.atomic import write_json
from layerscope.config import is_local_model, model_files
from layerscope.errors import LayerscopeError

MANIFEST_VERSION = 1
#: Distributions whose versions are recorded (names as pip knows them).
PACKAGES = (
    "torch",
    "transformers",
    "transformer-lens",
    "snakemake",
    "numpy",
    "pandas",
    "scikit-learn",
    "h5py",
    "matplotlib",
)
NOT_INSTALLED = "not installed"
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, non-ASCII kept: one text per value, whatever the key order."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_sha256(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions(names=PACKAGES) -> dict[str, str]:
    """``{"python": "3.11.9", "torch": "2.13.0", ..., "matplotlib": "not installed"}``.

    Read from installed metadata, so nothing is imported (cheap enough for a rule's params).
    """
    versions = {"python": platform.python_version()}
    versions.update({name: package_version(name) for name in names})
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _source_dir(path: str | os.PathLike | None) -> Path:
    return Path(path) if path is not None else Path(__file__).resolve().parent


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """Commit of the git checkout holding ``path`` (default: the layerscope source), or None."""
    return _git(["rev-parse", "HEAD"], _source_dir(path)) or None


def git_info(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """:func:`git_commit`, and whether tracked files differ from it (``dirty``); ``None`` values
    when the source is not in a git checkout (e.g. installed from a wheel)."""
    where = _source_dir(path)
    commit = git_commit(where)
    if not commit:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], where)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def platform_info() -> dict[str, str]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python_implementation": platform.python_implementation(),
    }


def find_seeds(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every value under a key named ``seed``, by its key path (``probes.seed``,
    ``datasets.numbers_phase2.seed``, ``a.list[2].seed``)."""
    seeds: dict[str, Any] = {}
    for path, key, value in _walk(obj, prefix):
        if key == "seed":
            seeds[path] = value
    return dict(sorted(seeds.items()))


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, key, value
            yield from _walk(value, path)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _walk(value, f"{prefix}[{i}]")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (weight files can be many GiB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def local_model_digest(source: str, base_dir: str | os.PathLike = ".") -> dict[str, Any]:
    """Per-file sha256 of a local model's config, weight and tokenizer files, and one sha256 over
    them (file names, sizes and hashes), which changes when any of them does."""
    root = Path(base_dir) / source
    if not (root / "config.json").is_file():
        raise LayerscopeError(f"{root}: local model directory without config.json")
    files: dict[str, dict[str, Any]] = {}
    for rel in model_files(source, base_dir):
        path = Path(base_dir) / rel
        name = path.relative_to(root).as_posix()
        files[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    total = hashlib.sha256()
    for name in sorted(files):
        total.update(f"{name}\0{files[name]['bytes']}\0{files[name]['sha256']}\n".encode())
    return {"sha256": total.hexdigest(), "files": dict(sorted(files.items()))}


def _hub_cache_dir() -> Path | None:
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


def hub_cached_commit(source: str, revision: str | None) -> str | None:
    """The commit the local Hugging Face cache resolves ``revision`` (default ``main``) of a hub
    model to, or None when it is not cached. A 40-hex revision is already a commit."""
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev.lower()):
        return rev.lower()
    cache = _hub_cache_dir()
    if cache is None:
        return None
    ref = cache / f"models--{source.replace('/', '--')}" / "refs" / rev
    try:
        return ref.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def model_record(model: Mapping[str, Any], base_dir: str | os.PathLike = ".") -> dict[str, Any]:
    source = str(model["source"])
    revision = model.get("revision")
    if is_local_model(source, base_dir):
        return {
            "kind": "local",
            "source": source,
            "revision": revision,
            **local_model_digest(source, base_dir),
        }
    return {
        "kind": "hub",
        "source": source,
        "revision": revision,
        "cached_commit": hub_cached_commit(source, revision),
    }


def layerscope_version() -> str:
    from layerscope import __version__

    return __version__


def build_manifest(
    config: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike = ".",
    git_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The manifest as a dict (see the module docstring); relative model paths are resolved
    against ``base_dir`` (the workflow's working directory)."""
    # Through JSON first: the same canonical form as the hash, and plain types only.
    try:
        config = json.loads(canonical_json(config))
    except TypeError as exc:
        raise LayerscopeError(f"the config cannot be written as JSON: {exc}") from exc
    return {
        "manifest_version": MANIFEST_VERSION,
        "layerscope": {"version": layerscope_version(), "git": git_info(git_path)},
        "versions": package_versions(),
        "platform": platform_info(),
        "config_sha256": config_sha256(config),
        "seeds": find_seeds(config),
        "models": {
            name: model_record(m, base_dir) for name, m in sorted(config.get("models", {}).items())
        },
        "config": config,
    }


def write_manifest(
    out_path: str | os.PathLike,
    config: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike = ".",
    git_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build the manifest and write it atomically (sorted keys: equal inputs give equal bytes)."""
    manifest = build_manifest(config, base_dir=base_dir, git_path=git_path)
    write_json(out_path, manifest)
    return manifest
