"""Readers refuse activation files built from a different prompt table than the current one."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from layerscope.data import h5cache
from layerscope.data.consistency import (
    TableMismatchError,
    check_against_table,
    check_files_against_table,
)
from layerscope.errors import LayerscopeError
from layerscope.jobs import stages as analysis
from layerscope.jobs.probe_runs import train_layer_probes

REPO = Path(__file__).resolve().parents[1]
N, D = 8, 4
PIDS = [f"p{i}" for i in range(N)]
LABELS = ["true" if i % 2 else "false" for i in range(N)]
GROUPS = [f"g{i // 2}" for i in range(N)]
FAST = {
    "n_splits": 2,
    "n_repeats": 1,
    "n_permutations": 0,
    "n_random_directions": 0,
    "seed": 0,
    "Cs": [1.0],
}


def write_layer(path: Path, pids=PIDS, labels=LABELS, groups=GROUPS, layer=3) -> Path:
    """A tiny complete per-layer file in the layout of layerscope.data.h5cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(pids)
    attrs = {
        "kind": "layer",
        "format_version": h5cache.FORMAT_VERSION,
        "model": "tiny",
        "model_revision": "local",
        "n_layers": 6,
        "d_model": D,
        "n_prompts": n,
        "hook_names": ["blocks.{L}.hook_resid_post"],
        "dtype": "float32",
        "prepend_bos": True,
        "exclude_bos_from_pooling": True,
        "compatibility_mode": False,
        "components": ["resid_post"],
        "poolings": ["mean"],
        "token_level_layers": [],
        "layer": layer,
    }
    rng = np.random.default_rng(layer)
    with h5cache.open_for_write(path) as f:
        h5cache.set_attrs(f, attrs)
        h5cache.write_strings(f, "prompt_id", pids)
        h5cache.write_strings(f, "label", labels)
        if groups is not None:
            h5cache.write_strings(f, "group", groups)
        f.create_dataset("n_tokens", data=np.full(n, 5, dtype=np.int32))
        f.create_dataset("n_pooled", data=np.full(n, 4, dtype=np.int32))
        ds = h5cache.create_float(f, "resid_post/mean", (n, D), "float32")
        X = rng.normal(size=(n, D)).astype(np.float32)
        X[:, 0] += 2.0 * (np.asarray(labels) == "true")
        ds[...] = X
        h5cache.mark_complete(f)
    return path


def write_table(path: Path, pids=PIDS, labels=LABELS, groups=GROUPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(
        {
            "prompt_id": pids,
            "text": [f"text of {p}" for p in pids],
            "label": labels,
            "group": groups,
            "provenance": "test",
        }
    )
    df.to_csv(path, index=False, lineterminator="\n")
    return path


@pytest.fixture
def files(tmp_path):
    layers = [
        write_layer(tmp_path / "results/activations/tiny/x" / f"layer_{L}.h5", layer=L)
        for L in (3, 4)
    ]
    return tmp_path, layers


def _changed_label(t):
    labels = list(LABELS)
    labels[5] = "false"
    return write_table(t, labels=labels)


def _dropped_row(t):
    keep = [i for i in range(N) if i != 2]
    return write_table(
        t, [PIDS[i] for i in keep], [LABELS[i] for i in keep], [GROUPS[i] for i in keep]
    )


def _reordered(t):
    order = [1, 0] + list(range(2, N))
    return write_table(
        t, [PIDS[i] for i in order], [LABELS[i] for i in order], [GROUPS[i] for i in order]
    )


def _changed_group(t):
    groups = list(GROUPS)
    groups[7] = "g9"
    return write_table(t, groups=groups)


CASES = {
    "changed_label": (
        _changed_label,
        [
            r"8 prompts vs 8",
            r"1 label\(s\) differ",
            r"'p5' \(row 6\): label 'true' in the "
            r"activations, 'false' in the table",
        ],
    ),
    "dropped_row": (_dropped_row, [r"8 prompts vs 7", r"'p2' is not in the table"]),
    "reordered": (
        _reordered,
        [
            r"8 prompts vs 8",
            r"same prompts in a different order",
            r"row 1: 'p0' in the activations, 'p1' in the table",
        ],
    ),
    "changed_group": (_changed_group, [r"1 group\(s\) differ", r"'p7' \(row 8\): group 'g3'"]),
}


def test_matching_table_passes(files):
    root, layers = files
    table = write_table(root / "results/datasets/x/prompts.csv")
    assert check_files_against_table(layers, table) == N
    check_against_table(
        PIDS, LABELS, None, layers[0], table
    )  # files without groups: groups not compared


@pytest.mark.parametrize("case", sorted(CASES))
def test_mismatch_names_both_files_counts_and_prompts(files, case):
    root, layers = files
    make, patterns = CASES[case]
    table = make(root / "results/datasets/x/prompts.csv")
    with pytest.raises(TableMismatchError) as info:
        check_files_against_table(layers, table)
    msg = str(info.value)
    assert msg.startswith(f"{layers[0]} was built for an older prompt table: ")
    assert str(table) in msg
    for pattern in patterns:
        assert re.search(pattern, msg), (pattern, msg)
    assert isinstance(info.value, LayerscopeError)


def test_a_table_row_added_and_ids_renamed(files):
    root, layers = files
    table = write_table(root / "t.csv", PIDS + ["p8"], LABELS + ["true"], GROUPS + ["g4"])
    with pytest.raises(
        TableMismatchError, match=r"8 prompts vs 9 .*'p8' is not in the activations"
    ):
        check_files_against_table(layers, table)
    renamed = ["q0"] + PIDS[1:]
    table = write_table(root / "u.csv", renamed)
    with pytest.raises(
        TableMismatchError,
        match=r"\(different prompt ids\).*'p0' is not in the table; "
        r"'q0' is not in the activations",
    ):
        check_files_against_table(layers, table)


def test_only_the_stale_layer_file_is_named(files):
    root, layers = files
    labels = list(LABELS)
    labels[0] = "true"
    stale = write_layer(root / "results/activations/tiny/x/layer_5.h5", labels=labels, layer=5)
    table = write_table(root / "results/datasets/x/prompts.csv")
    with pytest.raises(TableMismatchError, match=re.escape(str(stale))):
        check_files_against_table([*layers, stale], table)


def test_missing_files_are_reported(files):
    root, layers = files
    table = write_table(root / "results/datasets/x/prompts.csv")
    with pytest.raises(LayerscopeError, match="does not exist"):
        check_files_against_table([root / "nope/layer_1.h5"], table)
    with pytest.raises(LayerscopeError, match=r"prompts\.csv"):
        check_files_against_table(layers, root / "results/datasets/x/missing/prompts.csv")


def _stats(layers, table, out):
    return analysis.activation_stats_table(layers, out / "stats.csv", positive="true", table=table)


def _probes(layers, table, out):
    return train_layer_probes(
        layers[0],
        out / "probe.json",
        model="tiny",
        dataset="x",
        settings=FAST,
        positive="true",
        log=lambda m: None,
        table=table,
    )


def _geometry(layers, table, out):
    return analysis.geometry_figures(
        layers,
        out / "no_summary.csv",
        {"pca": out / "pca.png"},
        component="resid_post",
        pooling="mean",
        metric="auroc",
        model="tiny",
        dataset="x",
        formats=["png"],
        table=table,
    )


def _task_vectors(layers, table, out):
    return analysis.task_vector_analysis(
        layers,
        {"scores": out / "scores.csv"},
        component="resid_post",
        pooling="mean",
        n_boot=10,
        seed=0,
        layer=None,
        model="tiny",
        dataset="x",
        formats=["png"],
        table=table,
    )


def _generalization(layers, table, out):
    return analysis.generalization(
        {"x": layers},
        out / "gen.csv",
        out / "gen.png",
        component="resid_post",
        pooling="mean",
        metric="auroc",
        model="tiny",
        group="g",
        positive="true",
        settings=FAST,
        formats=["png"],
        tables={"x": table},
    )


READERS = {
    "activation_stats": _stats,
    "train_probe": _probes,
    "plot_geometry": _geometry,
    "task_vectors": _task_vectors,
    "generalization": _generalization,
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_every_reader_checks_before_writing(files, reader):
    root, layers = files
    table = _dropped_row(root / "results/datasets/x/prompts.csv")
    out = root / "out"
    with pytest.raises(TableMismatchError, match=r"8 prompts vs 7"):
        READERS[reader](layers, table, out)
    assert not out.exists()


def test_readers_run_on_a_matching_table(files):
    root, layers = files
    table = write_table(root / "results/datasets/x/prompts.csv")
    stats = _stats(layers, table, root)
    assert {"true", "false", "<diff>"} <= set(stats.label)
    doc = _probes(layers, table, root)
    assert doc["layer"] == 3 and (root / "probe.json").exists()


def _rules(text: str) -> dict[str, str]:
    """rule name -> its body, from a .smk file."""
    parts = re.split(r"^rule (\w+):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


#: Rules in files owned elsewhere that may not carry the table input yet.
PENDING = {"layer_index"}


def test_every_rule_reading_layer_files_takes_the_prompt_table():
    checked = []
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        for name, body in _rules(smk.read_text()).items():
            inputs = body.split("output:")[0]
            # Rules name another rule's files as rules.X.output (issue 14), once as literal paths.
            if "layer_{layer}.h5" not in inputs and "rules.extract_layer.output" not in inputs:
                continue
            takes_table = "prompts.csv" in inputs or "rules.prepare_dataset.output.table" in inputs
            if name in PENDING and not takes_table:
                continue
            assert takes_table, f"{smk.name}: rule {name} lacks the table"
            checked.append(name)
    assert {
        "train_probe",
        "activation_stats",
        "generalization",
        "plot_geometry",
        "task_vectors",
    } <= set(checked)
