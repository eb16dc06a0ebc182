"""Typed settings (layerscope.settings): one frozen dataclass per config section, defaults from the
schema only, and the same canonical JSON the workflow's params always carried."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

import pytest
import yaml

from layerscope import settings as S
from layerscope.config import SCHEMA_PATH
from layerscope.errors import ConfigError

SECTIONS = [
    S.ModelSettings,
    S.ActivationSettings,
    S.ProbeSettings,
    S.ProbeCausalSettings,
    S.GenerationSettings,
    S.PatchingSettings,
    S.PrecisionSettings,
    S.TaskVectorSettings,
    S.FigureSettings,
    S.CotSettings,
    S.TunedLensSettings,
    S.EarlyAnsweringSettings,
]
# Keys of a section that only the Snakefile reads (what runs, how it is split), not any job.
WORKFLOW_ONLY = {
    "ActivationSettings": {"shards"},
    "ProbeSettings": {"generalization", "causal"},
    "PatchingSettings": {"experiments"},
    "CotSettings": {"datasets"},
}


def schema_of(cls) -> dict:
    node = yaml.safe_load(SCHEMA_PATH.read_text())
    for key in cls.SCHEMA:
        node = node[key]
    return node


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_fields_are_the_schema_keys(cls):
    keys = set(schema_of(cls)["properties"]) - WORKFLOW_ONLY.get(cls.__name__, set())
    assert {f.name for f in dataclasses.fields(cls)} == keys


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_defaults_come_from_the_schema(cls):
    props = schema_of(cls)["properties"]
    given = {"source": "gpt2"} if cls is S.ModelSettings else {}
    built = cls.of(given).to_dict()
    for name, value in built.items():
        if name in given:
            continue
        default = props[name]["default"]
        if isinstance(built[name], dict):  # a nested section: its own schema's defaults
            assert built[name] == cls._field(name, default).to_dict()
        else:
            assert value == default, name


@pytest.mark.parametrize("cls", SECTIONS, ids=lambda c: c.__name__)
def test_every_field_has_a_docstring(cls):
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    documented = {
        a.target.id
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
        and isinstance(b.value.value, str)
    }
    assert {f.name for f in dataclasses.fields(cls)} <= documented


def test_frozen_and_lists_become_tuples():
    act = S.ActivationSettings.of({"components": ["resid_post", "attn_out"]})
    assert act.components == ("resid_post", "attn_out")
    with pytest.raises(dataclasses.FrozenInstanceError):
        act.poolings = ("max",)
    assert hash(act) == hash(S.ActivationSettings.of(act.to_json()))


def test_nested_section_and_round_trip():
    patching = S.PatchingSettings.of({"heads": False, "generation": {"enabled": True}})
    assert isinstance(patching.generation, S.GenerationSettings)
    assert patching.generation.enabled and patching.generation.max_new_tokens == 4
    assert S.PatchingSettings.of(patching.to_json()) == patching
    assert S.PatchingSettings.of(patching) is patching


def test_wrong_values_name_the_key():
    with pytest.raises(ConfigError, match=r"'poolings\[0\]'.*'median'"):
        S.ActivationSettings.of({"poolings": ["median"]})
    with pytest.raises(ConfigError, match="'dtyp': unknown key; did you mean 'dtype'"):
        S.ModelSettings.of({"source": "x", "dtyp": "float32"})
    with pytest.raises(ConfigError, match="source"):
        S.ModelSettings.of({})


def test_json_is_what_the_params_always_were(repo):
    """The validated demo config's sections, less the workflow-only keys, as sorted JSON: the params
    text of the jobs is unchanged, so existing results are not rerun."""
    from layerscope.config import validate_config

    config = yaml.safe_load((repo / "config/config.yaml").read_text())
    validate_config(config, SCHEMA_PATH, base_dir=repo)

    def stable(obj):
        return json.dumps(obj, sort_keys=True)

    def less(section, keys):
        return {k: v for k, v in config[section].items() if k not in keys}

    assert S.ActivationSettings.of(config["activations"]).to_json() == stable(
        less("activations", {"shards"})
    )
    assert S.ProbeSettings.of(config["probes"]).to_json() == stable(
        less("probes", {"generalization", "causal"})
    )
    assert S.PrecisionSettings.of(config["precision"]).to_json() == stable(config["precision"])
    patching = S.PatchingSettings.of(config["patching"]).to_dict()
    assert stable(patching) == stable(less("patching", {"experiments"}))
    model = S.ModelSettings.of(config["models"]["demo"])
    keys = ("source", "revision", "dtype", "compatibility_mode", "bos")
    assert model.identity() == {k: config["models"]["demo"][k] for k in keys}
