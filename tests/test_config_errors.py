"""Every config mistake is caught before any job runs, named by its key path and the reason.

Most cases call :func:`layerscope.config.validate_config` (schema, defaults and the checks beyond
it)
and :func:`layerscope.config.check_duplicate_keys` directly; a few run ``snakemake -n`` on a copy of
the
workflow to see the user's view: a non-zero exit, one short line, no ``results/``.
"""

import copy
import shutil

import pytest
import yaml
from conftest import REPO, copy_workflow, run_snakemake

from layerscope.config import check_duplicate_keys, validate_config
from layerscope.errors import ConfigError

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
DEMO = yaml.safe_load((REPO / "config/config.yaml").read_text())


def _demo():
    return copy.deepcopy(DEMO)


def _error(cfg, base_dir=REPO):
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, SCHEMA, base_dir=base_dir)
    return str(err.value)


def _set(cfg, path, value):
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[last] = value
    return cfg


def _rename(cfg, path, new_key):
    *parents, last = path.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[new_key] = node.pop(last)
    return cfg


# --- what passes ----------------------------------------------------------------------------------


def test_demo_config_passes_and_gets_defaults():
    cfg = _demo()
    assert validate_config(cfg, SCHEMA, base_dir=REPO) == {"demo": [0, 1, 2, 3, 4, 5]}
    assert cfg["activations"]["out_dtype"] == "float32"
    assert cfg["probes"]["inner_splits"] == 3
    assert cfg["models"]["demo"]["revision"] is None


def test_defaults_match_snakemake_validate():
    from snakemake.utils import validate

    minimal = {
        "models": {"demo": {"source": "demo/model"}},
        "datasets": {"t": {"kind": "task_grid", "tasks": ["a", "b"], "pairs": [[1, 2]]}},
    }
    ours, theirs = copy.deepcopy(minimal), copy.deepcopy(minimal)
    validate_config(ours, SCHEMA, base_dir=REPO)
    validate(theirs, str(SCHEMA), set_default=True)
    assert ours == theirs
    assert ours["activations"]["poolings"] == ["mean", "last"]
    assert ours["models"]["demo"]["layers"] == "all"


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, typo, expected",
    [
        (
            "activations.poolings",
            "polings",
            "'activations.polings': unknown key; did you mean 'poolings'?",
        ),
        ("models.demo.layers", "layer", "'models.demo.layer': unknown key; did you mean 'layers'?"),
        ("datasets", "dataset", "'dataset': unknown key; did you mean 'datasets'?"),
        (
            "datasets.facts_located_in.templates",
            "template",
            "'datasets.facts_located_in.template': unknown key; did you mean 'templates'?",
        ),
        ("probes.n_splits", "n_split", "'probes.n_split': unknown key; did you mean 'n_splits'?"),
        (
            "patching.experiments.numbers.pairs",
            "pair",
            "'patching.experiments.numbers.pair': unknown key",
        ),
    ],
)
def test_unknown_key_names_path_and_suggests(path, typo, expected):
    assert expected in _error(_rename(_demo(), path, typo))


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _error(_set(_demo(), "activations.zzz", 1))
    assert "'activations.zzz': unknown key" in msg and "poolings" in msg


def test_dataset_without_kind_says_kind_is_missing():
    cfg = _demo()
    del cfg["datasets"]["facts_located_in"]["kind"]
    assert "'datasets.facts_located_in.kind': required key is missing" in _error(cfg)


# --- wrong types and values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (
            "models.demo.batch_size",
            "big",
            ["'models.demo.batch_size'", "expected an integer", "'big'"],
        ),
        ("models.demo.batch_size", 0, ["'models.demo.batch_size'", "minimum of 1"]),
        ("figures.tsne", "yes", ["'figures.tsne'", "expected true/false", "'yes'"]),
        ("probes.Cs", 0.1, ["'probes.Cs'", "expected a list", "0.1"]),
        ("models.demo.dtype", "float61", ["'models.demo.dtype'", "did you mean 'float16'?"]),
        ("models.demo.layers", "al", ["'models.demo.layers'", "'all'", "list", "'al'"]),
        ("models.demo.layers", [0, -1], ["'models.demo.layers[1]'", "-1", "minimum of 0"]),
        (
            "datasets.numbers_phase2.max_per_class",
            {"faithful": 0},
            ["'datasets.numbers_phase2.max_per_class.faithful'"],
        ),
        (
            "datasets.facts_located_in.kind",
            "fact",
            ["'datasets.facts_located_in.kind'", "did you mean 'facts'?"],
        ),
    ],
)
def test_wrong_type_or_value_names_path_and_reason(path, value, expected):
    msg = _error(_set(_demo(), path, value))
    for part in expected:
        assert part in msg, msg
    assert "\n" not in msg


# --- layers ---------------------------------------------------------------------------------------


def test_layer_out_of_range_names_model_and_layer_count():
    msg = _error(_set(_demo(), "models.demo.layers", [0, 99]))
    assert (
        "'models.demo.layers'" in msg
        and "[99]" in msg
        and "demo/model" in msg
        and "6 layers" in msg
    )


@pytest.mark.parametrize(
    "path, value, key",
    [
        ("task_vectors.layer", 9, "task_vectors.layer"),
        ("activations.token_level_layers", [7], "activations.token_level_layers"),
    ],
)
def test_other_layer_settings_must_be_cached_layers(path, value, key):
    cfg = _set(_demo(), "models.demo.layers", [1, 3])
    msg = _error(_set(cfg, path, value))
    assert f"'{key}'" in msg and "demo" in msg and "[1, 3]" in msg


# --- components and poolings ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (
            "activations.components",
            ["resid_postt"],
            ["'activations.components[0]'", "did you mean 'resid_post'?"],
        ),
        (
            "activations.poolings",
            ["mean", "median"],
            ["'activations.poolings[1]'", "'median'", "'mean', 'last', 'max'"],
        ),
        ("patching.components", ["resid_mid"], ["'patching.components[0]'", "'resid_mid'"]),
        ("figures.component", "mlp_outt", ["'figures.component'", "did you mean 'mlp_out'?"]),
        (
            "figures.component",
            "mlp_out",
            ["'figures.component'", "not cached", "activations.components"],
        ),
        ("figures.pooling", "max", ["'figures.pooling'", "not cached", "activations.poolings"]),
        ("task_vectors.pooling", "max", ["'task_vectors.pooling'", "activations.poolings"]),
        (
            "task_vectors.component",
            "attn_out",
            ["'task_vectors.component'", "activations.components"],
        ),
    ],
)
def test_unknown_or_uncached_component_and_pooling(path, value, expected):
    msg = _error(_set(_demo(), path, value))
    for part in expected:
        assert part in msg, msg


# --- files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value",
    [
        ("datasets.facts_located_in.path", "demo/data/nope.csv"),
        ("datasets.numbers_phase2.scores", "demo/data/phase2/nope.csv"),
        ("datasets.numbers_phase2.responses", "nope.jsonl"),
        ("patching.experiments.numbers.pairs", "nope/pairs.csv"),
    ],
)
def test_missing_file_names_key_and_path(path, value):
    msg = _error(_set(_demo(), path, value))
    assert f"'{path}'" in msg and "file not found" in msg and value in msg


@pytest.fixture()
def model_copy(tmp_path):
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    return tmp_path


def test_model_dir_without_config_json(model_copy):
    (model_copy / "demo/model/config.json").unlink()
    msg = _error(_demo(), model_copy)
    assert "'models.demo.source'" in msg and "config.json" in msg


def test_model_dir_without_tokenizer(model_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / "demo/model" / name).unlink()
    msg = _error(_demo(), model_copy)
    assert "'models.demo.source'" in msg and "tokenizer" in msg


def test_misspelt_local_model_dir_is_not_taken_for_a_hub_id():
    msg = _error(_set(_demo(), "models.demo.source", "demo/modle"))
    assert "'models.demo.source'" in msg and "demo/modle" in msg and "not found" in msg


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["my/data", "../x", "a b", ".hidden", "", "x" * 81])
@pytest.mark.parametrize(
    "where", ["models", "datasets", "probes.generalization", "patching.experiments"]
)
def test_unsafe_name_is_rejected(where, name):
    cfg = _demo()
    node = cfg
    for part in where.split("."):
        node = node[part]
    node[name] = node.pop(next(iter(node)))
    msg = _error(cfg)
    assert f"'{where}.{name}'" in msg and "not safe as a path part" in msg


# --- duplicate names (YAML silently keeps the last) -----------------------------------------------

DUPLICATE_DATASET = """\
models:
  demo: {source: demo/model}
datasets:
  tasks:
    kind: task_grid
    tasks: [a, b]
    pairs: [[1, 2]]
  other: {kind: task_grid, tasks: [a, b], pairs: [[1, 2]]}
  tasks:
    kind: task_grid
    tasks: [c, d]
    pairs: [[3, 4]]
"""

DUPLICATE_MODEL = """\
models:
  demo:
    source: demo/model
    layers: [1]
  demo:
    source: demo/model
datasets:
  tasks: {kind: task_grid, tasks: [a, b], pairs: [[1, 2]]}
"""


@pytest.mark.parametrize(
    "text, key, lines",
    [
        (DUPLICATE_DATASET, "datasets.tasks", "lines 4 and 9"),
        (DUPLICATE_MODEL, "models.demo", "lines 2 and 5"),
        ("models:\n  demo: {source: a, source: b}\n", "models.demo.source", "line 2"),
    ],
    ids=["dataset", "model", "nested_key"],
)
def test_duplicate_keys_are_reported(tmp_path, text, key, lines):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        check_duplicate_keys([path])
    msg = str(err.value)
    assert f"'{key}'" in msg and "twice" in msg and lines in msg and str(path) in msg


def test_same_key_in_two_config_files_is_an_override_not_a_duplicate(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("models:\n  demo: {source: x}\n")
    second.write_text("models:\n  demo: {source: y}\n")
    check_duplicate_keys([first, second])
    check_duplicate_keys([REPO / "config/config.yaml", REPO / "config/examples/gpt2.yaml"])


def test_validate_config_checks_duplicates_in_its_config_files(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(DUPLICATE_DATASET)
    with pytest.raises(ConfigError, match="datasets.tasks"):
        validate_config(
            yaml.safe_load(DUPLICATE_DATASET), SCHEMA, configfiles=[path], base_dir=REPO
        )


# --- the user's view: snakemake -n ----------------------------------------------------------------


def _edit(text, old, new):
    assert old in text, old
    return text.replace(old, new, 1)


SNAKEMAKE_CASES = {
    "unknown_key": (
        lambda t: _edit(t, "  poolings: [mean, last]", "  polings: [mean, last]"),
        "config key 'activations.polings': unknown key; did you mean 'poolings'?",
    ),
    "duplicate_dataset": (
        lambda t: _edit(
            t,
            "\nactivations:",
            "  tasks:\n    kind: task_grid\n    tasks: [a, b]\n    pairs: [[1, 2]]\n\nactivations:",
        ),
        "config key 'datasets.tasks': defined twice in config/config.yaml",
    ),
    "bad_layer": (
        lambda t: _edit(t, "layers: all ", "layers: [0, 99] "),
        "config key 'models.demo.layers': layer(s) [99] out of range: "
        "model 'demo/model' has 6 layers (0-5)",
    ),
    "missing_file": (
        lambda t: _edit(t, "path: demo/data/facts.csv", "path: demo/data/nope.csv"),
        "config key 'datasets.facts_located_in.path': file not found: demo/data/nope.csv",
    ),
    "wrong_type": (
        lambda t: _edit(t, "batch_size: 32", 'batch_size: "big"'),
        "config key 'models.demo.batch_size': expected an integer >= 1, got 'big'",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SNAKEMAKE_CASES))
def test_snakemake_dry_run_stops_with_one_clear_line(tmp_path, case):
    edit, expected = SNAKEMAKE_CASES[case]
    work = copy_workflow(tmp_path)
    config = work / "config/config.yaml"
    config.write_text(edit(config.read_text()))
    proc = run_snakemake(work, "-n", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert any(line.strip().startswith(expected) for line in out.splitlines()), out
    assert "Traceback" not in out and "ValidationError" not in out and len(out.splitlines()) < 8, (
        out
    )
    assert not (work / "results").exists()
