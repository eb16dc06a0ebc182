"""Config checks beyond the schema, and the schema itself on the shipped configs."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from layerscope.config import check_config, model_files, resolve_layers
from layerscope.errors import ConfigError

SCHEMA = yaml.safe_load(
    (Path(__file__).parents[1] / "workflow/schemas/config.schema.yaml").read_text()
)


def validate(cfg):
    jsonschema.Draft202012Validator(SCHEMA).validate(cfg)


@pytest.mark.parametrize(
    "name",
    ["config/config.yaml", "config/examples/gpt2.yaml", "config/examples/deepseek_phase2.yaml"],
)
def test_shipped_configs_match_schema(repo, name):
    validate(yaml.safe_load((repo / name).read_text()))


def test_schema_rejects_typo_and_bad_values(repo):
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    bad = json.loads(json.dumps(cfg))
    bad["models"]["demo"]["layer"] = [1]
    with pytest.raises(jsonschema.ValidationError, match="layer"):
        validate(bad)
    bad = json.loads(json.dumps(cfg))
    bad["activations"]["poolings"] = ["median"]
    with pytest.raises(jsonschema.ValidationError, match="median"):
        validate(bad)
    bad = json.loads(json.dumps(cfg))
    bad["datasets"]["facts_located_in"]["template"] = "x"  # facts take 'templates'
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = json.loads(json.dumps(cfg))
    bad["datasets"]["../escape"] = bad["datasets"].pop("facts_located_in")
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)


def _model_dir(tmp_path, n_layer=4, tokenizer=True):
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": n_layer}))
    (root / "model.safetensors").write_bytes(
        (2).to_bytes(8, "little") + b"{}"
    )  # a valid, empty safetensors file
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
    return root


def _cfg(source="m", layers="all", **ds):
    return {
        "models": {"toy": {"source": source, "layers": layers}},
        "datasets": {"d": {"kind": "task_grid", "tasks": ["a", "b"], "pairs": [[1, 2]], **ds}},
        "activations": {"token_level_layers": []},
    }


def test_layers_all_expands_from_local_config(tmp_path):
    _model_dir(tmp_path, n_layer=3)
    assert check_config(_cfg(), tmp_path) == {"toy": [0, 1, 2]}
    assert check_config(_cfg(layers=[2, 0]), tmp_path) == {"toy": [0, 2]}


def test_layer_out_of_range_names_model_and_count(tmp_path):
    _model_dir(tmp_path, n_layer=4)
    with pytest.raises(ConfigError) as err:
        check_config(_cfg(layers=[1, 4]), tmp_path)
    msg = str(err.value)
    assert "models.toy.layers" in msg and "[4]" in msg and "4 layers" in msg


def test_hub_model_with_all_layers_needs_a_count():
    with pytest.raises(ConfigError, match="n_layers"):
        resolve_layers("hub", {"source": "gpt2", "layers": "all"})
    assert resolve_layers("hub", {"source": "gpt2", "layers": "all", "n_layers": 2}) == [0, 1]
    assert resolve_layers("hub", {"source": "gpt2", "layers": [11, 3]}) == [3, 11]


def test_model_dir_without_tokenizer_or_config(tmp_path):
    _model_dir(tmp_path, tokenizer=False)
    with pytest.raises(ConfigError, match="models.toy.source.*tokenizer"):
        check_config(_cfg(), tmp_path)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        check_config(_cfg(), tmp_path)


def test_missing_dataset_file_names_key(tmp_path):
    _model_dir(tmp_path)
    cfg = _cfg()
    cfg["datasets"]["facts"] = {
        "kind": "facts",
        "path": "nope.csv",
        "templates": {"r": "{subject}"},
    }
    with pytest.raises(ConfigError, match=r"datasets\.facts\.path.*nope\.csv"):
        check_config(cfg, tmp_path)


def test_token_level_layer_must_be_cached(tmp_path):
    _model_dir(tmp_path, n_layer=4)
    cfg = _cfg(layers=[1, 2])
    cfg["activations"]["token_level_layers"] = [3]
    with pytest.raises(ConfigError, match="token_level_layers"):
        check_config(cfg, tmp_path)


def test_model_files_lists_weights_and_tokenizer(tmp_path):
    _model_dir(tmp_path)
    assert model_files("m", tmp_path) == [
        "m/config.json",
        "m/model.safetensors",
        "m/tokenizer.json",
    ]
    assert model_files("gpt2", tmp_path) == []


def test_generalization_group_names_known_datasets(tmp_path):
    _model_dir(tmp_path)
    cfg = _cfg()
    cfg["probes"] = {"generalization": {"g": ["d", "missing"]}}
    with pytest.raises(ConfigError, match=r"probes\.generalization\.g.*missing"):
        check_config(cfg, tmp_path)
