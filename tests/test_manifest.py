"""results/manifest.json: contents, byte-identical reruns, model hashes that follow the weights."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from layerscope import __version__
from layerscope.errors import LayerscopeError
from layerscope.jobs import manifest
from layerscope.jobs.manifest import (
    NOT_INSTALLED,
    PACKAGES,
    canonical_json,
    config_sha256,
    find_seeds,
    git_info,
    package_versions,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def make_model(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (root / "tokenizer.json").write_text("{}")
    (root / "generation_config.json").write_text("{}")  # not something the activations depend on
    return root


def make_config(**over):
    cfg = {
        "models": {
            "local": {
                "source": "models/tiny",
                "layers": "all",
                "dtype": "float32",
                "revision": None,
            },
            "hub": {"source": "someone/some-model", "layers": [1, 2], "revision": "v1.0"},
        },
        "datasets": {"a": {"kind": "facts", "seed": 7}, "b": {"kind": "task_grid"}},
        "probes": {"seed": 0, "n_splits": 5, "generalization": {}},
        "task_vectors": {"seed": 1, "n_boot": 100},
        "patching": {"seed": 2, "experiments": {"e": {"pairs": "p.csv"}}},
        "extra": [{"seed": 11}, {"other": 1}],
    }
    cfg.update(over)
    return cfg


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    make_model(tmp_path / "models" / "tiny")
    monkeypatch.setattr(manifest, "_hub_cache_dir", lambda: tmp_path / "hf")
    return tmp_path


def test_contents(workdir):
    cfg = make_config()
    out = workdir / "results" / "manifest.json"
    doc = write_manifest(out, cfg, base_dir=workdir)
    assert json.loads(out.read_text()) == doc
    assert doc["layerscope"]["version"] == __version__
    assert set(doc["layerscope"]["git"]) == {"commit", "dirty"}
    versions = doc["versions"]
    assert set(versions) == {"python", *PACKAGES}
    assert all(isinstance(v, str) and v for v in versions.values())
    assert versions["numpy"] != NOT_INSTALLED and re.match(r"\d+\.\d+", versions["python"])
    assert doc["platform"]["system"] and doc["platform"]["machine"]
    assert doc["config_sha256"] == hashlib.sha256(canonical_json(cfg).encode()).hexdigest()
    assert doc["config"] == cfg
    assert doc["seeds"] == {
        "datasets.a.seed": 7,
        "extra[0].seed": 11,
        "patching.seed": 2,
        "probes.seed": 0,
        "task_vectors.seed": 1,
    }
    local = doc["models"]["local"]
    assert (
        local["kind"] == "local" and local["source"] == "models/tiny" and local["revision"] is None
    )
    assert set(local["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    weights = (workdir / "models/tiny/model.safetensors").read_bytes()
    assert local["files"]["model.safetensors"] == {
        "bytes": len(weights),
        "sha256": hashlib.sha256(weights).hexdigest(),
    }
    assert re.fullmatch(r"[0-9a-f]{64}", local["sha256"])
    assert doc["models"]["hub"] == {
        "kind": "hub",
        "source": "someone/some-model",
        "revision": "v1.0",
        "cached_commit": None,
    }
    # no wall-clock time anywhere
    assert not re.search(r"created|timestamp|date|\d{4}-\d\d-\d\dT", out.read_text())


def test_two_runs_write_identical_bytes_and_key_order_does_not_matter(workdir):
    cfg = make_config()
    a, b = workdir / "a.json", workdir / "b.json"
    write_manifest(a, cfg, base_dir=workdir)
    reordered = json.loads(json.dumps(cfg))
    reordered = {k: reordered[k] for k in reversed(list(reordered))}
    reordered["models"] = {
        k: dict(reversed(list(v.items()))) for k, v in reversed(list(reordered["models"].items()))
    }
    write_manifest(b, reordered, base_dir=workdir)
    assert a.read_bytes() == b.read_bytes()
    write_manifest(a, cfg, base_dir=workdir)
    assert a.read_bytes() == b.read_bytes()
    assert not list(workdir.glob(".*.tmp"))  # written via a temporary file, nothing left over


def test_config_edit_changes_the_config_hash(workdir):
    before = write_manifest(workdir / "m.json", make_config(), base_dir=workdir)
    cfg = make_config()
    cfg["probes"]["n_splits"] = 4
    after = write_manifest(workdir / "m.json", cfg, base_dir=workdir)
    assert before["config_sha256"] != after["config_sha256"] == config_sha256(cfg)
    assert before["models"] == after["models"]


def test_model_hash_follows_the_weight_files(workdir):
    cfg = make_config()
    first = write_manifest(workdir / "m.json", cfg, base_dir=workdir)["models"]["local"]
    weights = workdir / "models/tiny/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1  # "retrained": one byte differs, same size
    weights.write_bytes(bytes(data))
    second = write_manifest(workdir / "m.json", cfg, base_dir=workdir)["models"]["local"]
    assert second["sha256"] != first["sha256"]
    assert (
        second["files"]["model.safetensors"]["sha256"]
        != first["files"]["model.safetensors"]["sha256"]
    )
    assert second["files"]["config.json"] == first["files"]["config.json"]
    # a new shard of weights counts too; a file the activations do not depend on does not
    (workdir / "models/tiny/generation_config.json").write_text('{"temperature": 0.5}')
    assert (
        write_manifest(workdir / "m.json", cfg, base_dir=workdir)["models"]["local"]["sha256"]
        == second["sha256"]
    )
    (workdir / "models/tiny/model-00002-of-00002.safetensors").write_bytes(b"more")
    third = write_manifest(workdir / "m.json", cfg, base_dir=workdir)["models"]["local"]
    assert (
        third["sha256"] != second["sha256"] and "model-00002-of-00002.safetensors" in third["files"]
    )


def test_hub_revision_resolved_from_the_local_cache(workdir):
    refs = workdir / "hf" / "models--someone--some-model" / "refs"
    refs.mkdir(parents=True)
    (refs / "v1.0").write_text("a" * 40 + "\n")
    doc = write_manifest(workdir / "m.json", make_config(), base_dir=workdir)
    assert doc["models"]["hub"]["cached_commit"] == "a" * 40
    pinned = make_config()
    pinned["models"]["hub"]["revision"] = "B" * 40
    assert (
        write_manifest(workdir / "m.json", pinned, base_dir=workdir)["models"]["hub"][
            "cached_commit"
        ]
        == "b" * 40
    )


def test_missing_local_model_is_an_error(workdir):
    cfg = make_config()
    cfg["models"]["local"]["source"] = "./models/gone"  # a path (a bare "a/b" would be a hub id)
    with pytest.raises(LayerscopeError, match="models/gone"):
        write_manifest(workdir / "m.json", cfg, base_dir=workdir)
    assert not (workdir / "m.json").exists()


def test_helpers(tmp_path):
    assert package_versions(["surely-not-an-installed-distribution"]) == {
        "python": package_versions([])["python"],
        "surely-not-an-installed-distribution": NOT_INSTALLED,
    }
    assert find_seeds({"seed": 1, "a": {"b": [{"seed": 2}], "seeds": [3]}}) == {
        "seed": 1,
        "a.b[0].seed": 2,
    }
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'


def test_demo_config_records_the_bundled_model():
    import yaml

    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    doc = manifest.build_manifest(cfg, base_dir=REPO)
    demo = doc["models"]["demo"]
    assert demo["kind"] == "local" and "model.safetensors" in demo["files"]
    assert "probes.seed" in doc["seeds"]
