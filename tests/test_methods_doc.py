"""docs/methods.md defines every column of every table the workflow writes.

The doc declares each table with a line ``Columns of `results/...csv```` (or ``Keys of
`results/...json```) followed by a markdown table whose first cell names the columns in
backticks (``{placeholder}`` parts match any text: ``norm_{task}``). :func:`undocumented` walks a
results tree and lists every CSV column and every top-level JSON key that no such table defines,
and every table whose path matches no declared pattern; the tests run it on real outputs of the
workflow's own writers, so a column added to any table without a definition fails here.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = REPO / "docs" / "methods.md"
DEMO = REPO / "demo"

_DECL = re.compile(r"^(?:Columns|Keys) of `(results/[^`]+)`")
_NAME = re.compile(r"`([^`]+)`")


def documented_tables(text: str) -> dict[str, set[str]]:
    """Path pattern -> the column (or key) names its table defines."""
    tables: dict[str, set[str]] = {}
    current = None
    in_table = False
    for line in text.splitlines():
        m = _DECL.match(line)
        if m:
            current, in_table = m.group(1), False
            tables.setdefault(current, set())
            continue
        if current is None:
            continue
        if line.startswith("|"):
            in_table = True
            first = line.strip().strip("|").split("|")[0]
            tables[current].update(_NAME.findall(first))
        elif in_table:  # the table ended
            current, in_table = None, False
    return tables


def _pattern(template: str) -> re.Pattern:
    """A ``{placeholder}`` template as a regex matching any text for each placeholder."""
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("[^/]+".join(re.escape(p) for p in parts) + r"\Z")


def table_columns(path: Path) -> list[str]:
    """A CSV's header, or a JSON file's top-level keys."""
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as f:
            return list(json.load(f))
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def results_tables(results: Path) -> list[Path]:
    """Every table of a results tree: each CSV and each JSON (top-level keys), except the run
    record ``results/manifest.json`` (the config and versions, not numbers of a method)."""
    return sorted(
        p
        for p in results.rglob("*")
        if p.suffix in (".csv", ".json") and p != results / "manifest.json"
    )


def undocumented(results: Path, text: str) -> list[str]:
    """Problems: tables without a declaration in ``text``, columns without a definition."""
    tables = documented_tables(text)
    problems = []
    for path in results_tables(results):
        rel = "results/" + path.relative_to(results).as_posix()
        matches = [t for t in tables if _pattern(t).match(rel)]
        if not matches:
            problems.append(f"{rel}: no 'Columns of `...`' table in docs/methods.md")
            continue
        defined = set().union(*(tables[t] for t in matches))
        patterns = [_pattern(d) for d in defined if "{" in d]
        for col in table_columns(path):
            if col not in defined and not any(p.match(col) for p in patterns):
                problems.append(f"{rel}: column {col!r} is not defined in docs/methods.md")
    return problems


# --------------------------------------------------------------------------------------------
# the checker itself


def test_checker_flags_a_new_column_and_an_undeclared_table(tmp_path):
    """The mechanism can fail: an extra column or an unknown table is reported, by name."""
    text = "Columns of `results/x/{model}/t.csv`:\n\n| column | definition |\n|---|---|\n"
    text += "| `a`, `b` | two. |\n| `norm_{task}` | one per task. |\n\nprose `c` here\n"
    assert documented_tables(text) == {"results/x/{model}/t.csv": {"a", "b", "norm_{task}"}}
    (tmp_path / "x" / "demo").mkdir(parents=True)
    (tmp_path / "x" / "demo" / "t.csv").write_text("a,b,norm_sum\n1,2,3\n")
    assert undocumented(tmp_path, text) == []
    (tmp_path / "x" / "demo" / "t.csv").write_text("a,b,c,norm_sum\n1,2,3,4\n")
    assert undocumented(tmp_path, text) == [
        "results/x/demo/t.csv: column 'c' is not defined in docs/methods.md"
    ]
    (tmp_path / "y.csv").write_text("a\n1\n")
    (tmp_path / "summary.json").write_text('{"k": 1}')
    assert len(undocumented(tmp_path, text)) == 3


def test_methods_doc_declares_every_table_family():
    tables = documented_tables(METHODS.read_text(encoding="utf-8"))
    for path in (
        "results/datasets/{dataset}/prompts.csv",
        "results/probes/{model}/{dataset}/summary.csv",
        "results/stats/{model}/{dataset}/activation_stats.csv",
        "results/task_vectors/{model}/{dataset}/scores.csv",
        "results/patching/{model}/{experiment}/summary.csv",
        "results/patching/{model}/{experiment}/generation_summary.csv",
        "results/steering/{model}/{experiment}/effects.csv",
        "results/steering/{model}/{experiment}/summary.json",
    ):
        assert tables.get(path), path
    assert (
        "logit_recovery_note"
        in tables["results/patching/{model}/{experiment}/generation_summary.csv"]
    )


# --------------------------------------------------------------------------------------------
# real outputs


def test_every_table_of_the_test_config_run_is_defined(test_config_run):
    """Every CSV and summary.json of a full run of the .test config (the suite's shared session
    run, tests/conftest.py; building it costs about 90 s on a worker that has not yet)."""
    results = test_config_run / "results"
    assert len(results_tables(results)) > 10
    assert undocumented(results, METHODS.read_text(encoding="utf-8")) == []


def _steering_and_generation(results: Path, tmp: Path) -> None:
    """Steering and generation patching (which the .test config leaves out), by the jobs' own
    functions on the demo model, written where the workflow writes them."""
    from layerscope.jobs.stages import patching_experiment
    from layerscope.jobs.steering_run import steering_experiment

    model = {"source": str(DEMO / "model")}
    pairs = pd.read_csv(DEMO / "data" / "patching_pairs.csv", dtype=str, keep_default_na=False)
    pairs.iloc[:3].to_csv(tmp / "pairs.csv", index=False)
    out = results / "patching" / "demo" / "numbers"
    names = ("cells.csv", "arrays.h5", "summary.csv", "generation.csv", "generation_summary.csv")
    patching_experiment(
        tmp / "pairs.csv",
        {n.split(".")[0]: out / n for n in names},
        model=model,
        settings={
            "components": ["resid_post"],
            "positions": 2,
            "heads": False,
            "n_boot": 20,
            "generation": {"enabled": True, "positions": ["diff", -1], "layers": [4]},
        },
        experiment="numbers",
        model_name="demo",
        device="cpu",
        batch_size=16,
        threads=None,
        precision={},
        log=lambda msg: None,
    )
    prompts = pd.read_csv(DEMO / "data" / "steering" / "numbers.csv", dtype=str)
    prompts = prompts.iloc[:4]
    prompts.to_csv(tmp / "prompts.csv", index=False)
    np.save(tmp / "direction.npy", np.random.default_rng(0).standard_normal(128))
    (tmp / "neutral.txt").write_text("The sky is blue\nNumbers are fun\n")
    out = results / "steering" / "demo" / "numbers"
    experiment = {
        "prompts": str(tmp / "prompts.csv"),
        "direction": {"source": "file", "path": str(tmp / "direction.npy")},
        "layers": [1],
        "alphas": [-1.0, 1.0],
        "hook": "resid_post",
        "positions": "all",
        "neutral": str(tmp / "neutral.txt"),
        "n_random": 2,
        "seed": 0,
        "max_new_tokens": 2,
    }
    steering_experiment(
        {
            "prompts": tmp / "prompts.csv",
            "neutral": tmp / "neutral.txt",
            "path": experiment["direction"]["path"],
        },
        {
            n: out / f"{n}.{'json' if n == 'summary' else 'csv'}"
            for n in ("effects", "per_prompt", "norms", "generations", "summary")
        },
        model=model,
        experiment=experiment,
        precision={},
        device="cpu",
        batch_size=16,
        threads=None,
        log=lambda msg: None,
    )


def _generalization(results: Path, run: Path) -> None:
    """A generalization table (the .test config has no group): the numbers dataset against a
    copy of itself, by the job's own function."""
    from layerscope.jobs.stages import generalization

    layers = sorted(
        (run / "results" / "activations" / "demo" / "numbers_phase2").glob("layer_*.h5")
    )
    table = run / "results" / "datasets" / "numbers_phase2" / "prompts.csv"
    generalization(
        {"numbers": layers, "numbers_again": layers},
        results / "probes" / "demo" / "generalization_g.csv",
        component="resid_post",
        pooling="mean",
        metric="auroc",
        model="demo",
        group="g",
        positive="faithful",
        settings={"n_splits": 3, "inner_splits": 2, "Cs": [0.1, 1.0]},
        tables={"numbers": table, "numbers_again": table},
        n_boot=20,
    )


def test_steering_generation_and_generalization_tables_are_defined(test_config_run, tmp_path):
    """The tables the .test config does not write, from the jobs' own writers (about 15 s)."""
    results = tmp_path / "results"
    for d in ("patching/demo/numbers", "steering/demo/numbers", "probes/demo"):
        (results / d).mkdir(parents=True)
    _steering_and_generation(results, tmp_path)
    _generalization(results, test_config_run)
    found = {p.relative_to(results).as_posix() for p in results_tables(results)}
    assert {
        "patching/demo/numbers/generation_summary.csv",
        "steering/demo/numbers/effects.csv",
        "steering/demo/numbers/generations.csv",
        "steering/demo/numbers/summary.json",
        "probes/demo/generalization_g.csv",
    } <= found
    summary = pd.read_csv(results / "patching/demo/numbers/generation_summary.csv")
    assert summary["logit_recovery_note"].fillna("").ne("").any()  # diff cells: says why
    assert undocumented(results, METHODS.read_text(encoding="utf-8")) == []
    shutil.rmtree(results)


# --------------------------------------------------------------------------------------------
# two tables recomputed from the doc alone


def test_tables_recomputed_from_the_doc_alone_match(test_config_run):
    """bench/recompute_from_methods.py (imports nothing from layerscope) recomputes the activation
    statistics and the patching summary of the .test run from docs/methods.md's definitions, with
    plain transformers; they must match the workflow's tables (about 10 s)."""
    import ast
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location(
        "recompute_from_methods", REPO / "bench" / "recompute_from_methods.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.split(".")[0] in ("layerscope", "devkit") for m in imported), imported
    model = bench.GPT2LMHeadModel.from_pretrained(DEMO / "model", attn_implementation="eager")
    tok = bench.AutoTokenizer.from_pretrained(DEMO / "model")
    results = test_config_run / "results"
    assert bench.check_stats(results, "demo", "numbers_phase2", model.eval(), tok) == []
    opts = SimpleNamespace(
        model_name="demo", components=["resid_post"], positions=2, heads=False, n_boot=1000, seed=0
    )
    pairs = DEMO / "data" / "patching_pairs.csv"
    bos = bench.recorded_bos(results, "demo")
    threads = bench.torch.get_num_threads()
    bench.torch.set_num_threads(1)  # hundreds of tiny single-prompt passes: threads only contend
    try:
        assert bench.check_patching(results, "numbers", pairs, model, tok, bos, opts) == []
    finally:
        bench.torch.set_num_threads(threads)


def test_steering_scale_positions_and_kl_as_the_doc_defines_them():
    """methods, Steering: the scale is the token-weighted mean norm without BOS over the inputs,
    BOS is never steered, and the neutral KL averages the steered positions only; recomputed with
    a plain-transformers hook loop (about 20 s, most of it loading the model twice)."""
    import torch
    from transformers import AutoModelForCausalLM

    from layerscope.engine.loading import load_engine
    from layerscope.interventions import steering as S
    from layerscope.jobs.steering_run import load_neutral, load_prompts

    bridge, _ = load_engine(
        str(DEMO / "model"), engine="native", components=["resid_post"], device="cpu"
    )
    hf = AutoModelForCausalLM.from_pretrained(DEMO / "model", attn_implementation="eager").eval()
    prompts = load_prompts(DEMO / "data" / "steering" / "numbers.csv").iloc[:5]
    neutral = load_neutral(DEMO / "data" / "steering" / "neutral.txt")[:3]
    sp = S.prepare_prompts(bridge.tokenizer, prompts, neutral, prepend_bos=True)
    d = np.random.default_rng(7).standard_normal(128)
    res = S.steering_sweep(bridge, sp, {2: d}, alphas=[1.0], n_random=1, position="all")
    row = res.effects.set_index(["source", "alpha", "metric"]).loc[("direction", 1.0)]

    block = hf.transformer.h[2]

    def logits(ids, vec=None):
        grabbed = []

        def hook(m, args, out):
            grabbed.append(out[0].double())
            if vec is None:
                return None
            out = out.clone()
            out[:, 1:] += vec.to(out.dtype)  # every position but BOS
            return out

        handle = block.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return hf(torch.tensor([ids])).logits[0].double(), grabbed[0]
        finally:
            handle.remove()

    norms = [logits(ids)[1][1:].norm(dim=-1) for ids in sp.ids]  # BOS left out
    scale = float(torch.cat(norms).mean())  # over tokens, not a mean of per-prompt means
    assert float(res.norms["scale"].iloc[0]) == pytest.approx(scale, rel=1e-5)
    vec = torch.as_tensor(scale * d / np.linalg.norm(d))
    kls = []
    for ids in sp.neutral_ids:
        p0 = torch.log_softmax(logits(ids)[0], -1)[1:]
        p1 = torch.log_softmax(logits(ids, vec)[0], -1)[1:]
        kls.append(float((p0.exp() * (p0 - p1)).sum(-1).mean()))
    assert row.loc["kl_neutral", "value"] == pytest.approx(np.mean(kls), rel=1e-3)
    change = []
    for ids, a, b in zip(sp.ids, sp.positive_id, sp.negative_id):
        z0, z1 = logits(ids)[0][-1], logits(ids, vec)[0][-1]
        change.append(float((z1[a] - z1[b]) - (z0[a] - z0[b])))
    assert row.loc["logit_diff", "value"] == pytest.approx(np.mean(change), rel=1e-3, abs=1e-4)
