"""Setups whose results can only be degenerate are refused or carry a named warning (issue 23).

One test per case of the issue: an answer rule that never matches, max_new_tokens 1, a clean run
that never gives the clean answer, steering positions past the prompts, max_tokens_per_batch below
the prompts, multi-token steering targets; plus the warnings field of the summaries and the figures.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from layerscope.analysis.power import rate_precision, wilson_interval
from layerscope.engine import store, tokens
from layerscope.engine.loading import load_model
from layerscope.errors import InputError, LayerscopeError
from layerscope.interventions import generation as G
from layerscope.interventions import patching as P
from layerscope.interventions import steering as S
from layerscope.jobs import steering_run as R
from layerscope.jobs.stages import patching_experiment
from layerscope.plotting import patching as pp
from layerscope.plotting import plots

DEMO = REPO / "demo" / "model"
STEER = REPO / "demo" / "data" / "steering"


@pytest.fixture(scope="module")
def bridge():
    return load_model(str(DEMO), device="cpu")[0]


@pytest.fixture(scope="module")
def pairs():
    return P.load_pairs(REPO / "demo/data/patching_pairs.csv").iloc[:4].copy()


def _clean_check(bridge, pairs, **kw):
    kw = {"max_new_tokens": 4, **kw}
    return G.clean_run_check(G.stepper_for(bridge), bridge.tokenizer, pairs, **kw)


# ------------------------------------------------------------------------------------------------
# generation patching


def test_the_demo_setup_passes_the_clean_run_check(bridge, pairs):
    assert _clean_check(bridge, pairs) == []


def test_an_answer_rule_that_never_matches_is_refused(bridge, pairs):
    with pytest.raises(LayerscopeError) as exc:
        _clean_check(bridge, pairs, answer_regex="answer: ([0-9]+)")
    msg = str(exc.value)
    assert "matched none of 4 clean generations" in msg and "(first: '" in msg
    assert "set patching.generation.answer_regex" in msg


def test_max_new_tokens_1_is_refused(bridge, pairs):
    with pytest.raises(LayerscopeError) as exc:
        _clean_check(bridge, pairs, max_new_tokens=1)
    msg = str(exc.value)
    assert (
        "blank within max_new_tokens=1" in msg and "raise patching.generation.max_new_tokens" in msg
    )


def test_a_clean_run_that_never_gives_the_clean_answer_is_a_named_warning(bridge, pairs):
    wrong = pairs.copy()
    wrong["clean_answer"] = " 1"  # the demo model answers with the larger three-digit number
    warnings = _clean_check(bridge, wrong)
    assert len(warnings) == 1 and warnings[0].startswith("clean_run_never_clean:")
    assert "0 of 4 pairs" in warnings[0] and "expected '1'" in warnings[0]


def test_judging_the_clean_runs_without_a_model():
    """The rules themselves: blank generations, empty answers, no clean answer, a good run."""
    gp = [G.GenPair("p", [1, 2], [1, 3], "586", "328")]
    with pytest.raises(LayerscopeError, match="max_new_tokens"):
        G.judge_clean_runs(gp, [" "], 1, G.DEFAULT_ANSWER_REGEX)
    with pytest.raises(LayerscopeError, match="answer_regex"):
        G.judge_clean_runs(gp, [" 586"], 4, "answer: ([0-9]+)")
    assert G.judge_clean_runs(gp, [" 328"], 4, G.DEFAULT_ANSWER_REGEX)[0].startswith(
        "clean_run_never_clean"
    )
    assert G.judge_clean_runs(gp, [" 586"], 4, G.DEFAULT_ANSWER_REGEX) == []


def _patching_settings(**generation):
    from layerscope.config import load_schema

    props = load_schema()["properties"]["patching"]["properties"]
    gen = {k: v.get("default") for k, v in props["generation"]["properties"].items()}
    gen.update(enabled=True, layers=[0], positions=["diff"], ranges=[], **generation)
    return {
        "experiments": {},
        "components": ["resid_post"],
        "positions": 1,
        "heads": False,
        "n_boot": 100,
        "seed": 0,
        "generation": gen,
    }


def _patch(tmp_path, pairs_df, **generation):
    path = tmp_path / "pairs.csv"
    pairs_df.drop(columns="source_line").to_csv(path, index=False)
    names = ("run", "cells", "arrays", "summary", "generation", "generation_summary")
    ext = {"run": "json", "arrays": "h5"}
    out = {k: tmp_path / f"{k}.{ext.get(k, 'csv')}" for k in names}
    info = patching_experiment(
        path,
        out,
        model={"source": str(DEMO), "dtype": "float32", "bos": "auto"},
        settings=_patching_settings(**generation),
        precision={"confidence": 0.95, "half_width": 0.1, "rate_effect": 0.2, "power": 0.8},
        experiment="x",
        model_name="demo",
        device="cpu",
        batch_size=16,
        threads=1,
        log=lambda m: None,
    )
    return info, out


def test_patching_job_refuses_before_the_sweep_and_records_warnings(tmp_path, pairs):
    with pytest.raises(LayerscopeError, match="answer_regex"):
        _patch(tmp_path, pairs, answer_regex="answer: ([0-9]+)")
    assert not (tmp_path / "cells.csv").exists()  # refused before the logit sweep wrote anything
    wrong = pairs.copy()
    wrong["clean_answer"] = " 1"
    info, out = _patch(tmp_path, wrong)
    doc = json.loads(out["run"].read_text())
    assert doc["warnings"] == info["warnings"] and doc["warnings"][0].startswith(
        "clean_run_never_clean"
    )
    assert doc["n_pairs"] == 4


def test_generation_figure_subtitle_shows_the_warning_and_only_the_kinds_shown():
    row = dict.fromkeys(G.SUMMARY_COLUMNS, 0)
    row.update(component="resid_post", layer=0, position="diff", position_kind="diff", n_pairs=4)
    fig = pp.draw_generation_heatmap(
        pd.DataFrame([row]), model="demo", experiment="x", warnings=["clean_run_never_clean: z"]
    )
    title = fig._suptitle.get_text()
    assert "WARNING clean_run_never_clean: z" in title
    assert "diff = " in title and "genK" not in title and "genA-B" not in title


# ------------------------------------------------------------------------------------------------
# steering


def _prompts(tokenizer, positive=" 731", negative=" 129"):
    df = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "prompt": ["Which is larger: 129 or 731? Answer:", "Which is larger: 9 or 7? Answer:"],
            "positive": [positive] * 2,
            "negative": [negative] * 2,
        }
    )
    neutral = R.load_neutral(STEER / "neutral.txt")[:2]
    return S.prepare_prompts(tokenizer, df, neutral, prepend_bos=True)


def test_steering_positions_past_every_prompt_are_refused(bridge):
    sp = _prompts(bridge.tokenizer)
    with pytest.raises(InputError) as exc:
        R.setup_warnings(sp, {"positions": 100}, "numbers")
    msg = str(exc.value)
    assert (
        "every effect would be exactly 0" in msg and "steering.experiments.numbers.positions" in msg
    )


def test_steering_positions_past_some_prompts_are_a_named_warning(bridge):
    sp = _prompts(bridge.tokenizer, " Paris", " Rome")  # one-token answers: no other warning
    sp.neutral_ids = [list(range(60))]  # neutral prompts longer than any position used here
    short, long_ = sorted(len(r) for r in sp.ids)
    assert short < long_
    (w,) = R.setup_warnings(sp, {"positions": short}, "numbers")
    assert w.startswith("positions_past_prompt:") and "1 of 2 prompts" in w


def test_multi_token_targets_are_a_named_warning(bridge):
    # One token each in the demo tokenizer (" Paris", " Rome"; " Tokyo" is four tokens).
    assert all(
        len(bridge.tokenizer.encode(w, add_special_tokens=False)) == 1 for w in (" Paris", " Rome")
    )
    one = _prompts(bridge.tokenizer, " Paris", " Rome")
    many = _prompts(bridge.tokenizer, " Paris is lovely", " Rome")
    assert R.setup_warnings(one, {"positions": "all"}, "e") == []
    (w,) = R.setup_warnings(many, {"positions": "all"}, "e")
    assert w.startswith("targets_multi_token:") and "steering.experiments.e.targets" in w
    # the compared tokens are the same: the effects are identical, which the warning explains
    assert list(one.positive_id) == list(many.positive_id)


def test_steering_summary_and_figure_carry_the_warnings(tmp_path):
    np.save(tmp_path / "dir.npy", np.random.default_rng(3).standard_normal(128))
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt_id,prompt\na,The capital of France is\nb,The capital of Japan is\n")
    exp = {
        "prompts": str(prompts),
        "targets": {"positive": " goodness gracious", "negative": " bad"},
        "direction": {"source": "file", "path": str(tmp_path / "dir.npy")},
        "layers": [2],
        "alphas": [0.5],
        "hook": "resid_post",
        "positions": "all",
        "neutral": str(STEER / "neutral.txt"),
        "n_random": 10,
        "seed": 0,
        "max_new_tokens": 0,
    }
    out = {
        k: tmp_path / f"{k}.{'json' if k == 'summary' else 'csv'}"
        for k in ("effects", "per_prompt", "norms", "generations", "summary")
    }
    files = {"prompts": prompts, "neutral": STEER / "neutral.txt", "path": tmp_path / "dir.npy"}
    R.steering_experiment(
        files,
        out,
        model={"source": str(DEMO), "dtype": "float32", "bos": "auto"},
        experiment=exp,
        precision={},
        device="cpu",
        batch_size=16,
        threads=1,
        name="e",
        log=lambda m: None,
    )
    warnings = json.loads(out["summary"].read_text())["warnings"]
    assert [w.split(":")[0] for w in warnings] == ["targets_multi_token"]
    fig = plots._draw_steering_dose_response(
        pd.read_csv(out["effects"]), model="demo", experiment="e", warnings=warnings
    )
    title = fig._suptitle.get_text()
    assert "WARNING targets_multi_token" in title and "(model: demo)" in title.splitlines()[0]


# ------------------------------------------------------------------------------------------------
# caching and intervals


def test_max_tokens_per_batch_below_the_prompts_is_a_named_warning():
    lengths = [26, 26, 24, 20]
    batches = tokens.make_batches(lengths, 32, 5)
    assert tokens.batches_over_cap(lengths, batches, 5) == [0, 1, 2, 3]
    assert tokens.batches_over_cap(lengths, tokens.make_batches(lengths, 32, 60), 60) == []
    logged = []
    req = SimpleNamespace(
        shard=None,
        max_tokens_per_batch=5,
        token_level_layers=[],
        batch_size=32,
        components=["resid_post"],
        poolings=["mean"],
        bos_policy="auto",
    )
    plan = SimpleNamespace(
        n=4, lengths=lengths, batches=batches, n_layers=2, prepend=True, skip=1, n_total=4
    )
    store._log_plan(req, plan, "cpu", logged.append)
    (warning,) = [m for m in logged if m.startswith("WARNING")]
    assert "max_tokens_per_batch_exceeded: 4 of 4 batches" in warning and "at least 26" in warning


def test_wilson_bounds_are_exact_at_0_and_n():
    lo, hi = wilson_interval([0, 16, 5], [16, 16, 16])
    assert lo[0] == 0.0 and hi[1] == 1.0 and 0 < lo[2] < hi[2] < 1
    assert rate_precision(0, 16, half_width=0.1, effect=0.2, p0=0.0)["ci_low"] == 0.0


# ------------------------------------------------------------------------------------------------
# labelled data with two classes: positive_class


def _labelled(tmp_path, **extra):
    rows = [("a cat sat", "cat"), ("a dog ran", "dog")] * 4
    path = tmp_path / "two.csv"
    path.write_text("text,label\n" + "".join(f"{t} {i},{c}\n" for i, (t, c) in enumerate(rows)))
    return {"kind": "labelled", "path": str(path), **extra}


def test_labelled_positive_class_orders_the_classes_and_reaches_mass_mean(tmp_path):
    from layerscope.data.datasets import build_prompt_table

    table, summary = build_prompt_table("two", _labelled(tmp_path, positive_class="cat"))
    assert summary["positive_class"] == "cat" and summary["classes"] == ["dog", "cat"]
    _, default = build_prompt_table("two", _labelled(tmp_path))
    assert default["positive_class"] is None
    # mass-mean points from the other class towards the positive one
    X = np.where((table["label"] == "cat").to_numpy()[:, None], 1.0, -1.0) * np.ones((1, 3))
    d = S.mass_mean_direction(X, table["label"].tolist(), summary["positive_class"])
    assert np.allclose(d, np.ones(3) / np.sqrt(3))


@pytest.mark.parametrize(
    "value, words", [("bird", "is not a class"), (1, "expected a non-empty string")]
)
def test_labelled_positive_class_errors_name_the_key(tmp_path, value, words):
    from layerscope.data.datasets import build_prompt_table
    from layerscope.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        build_prompt_table("two", _labelled(tmp_path, positive_class=value))
    assert "datasets.two.positive_class" in str(exc.value) and words in str(exc.value)


def test_steering_summary_says_what_alpha_points_towards(tmp_path):
    probe = tmp_path / "layer_1.json"
    doc = {
        "probes": [
            {
                "component": "resid_post",
                "pooling": "last",
                "result": {"classes": ["unfaithful", "faithful"], "coef": [[1.0, 0.0]]},
            }
        ]
    }
    probe.write_text(json.dumps(doc))
    spec = {"source": "probe", "dataset": "d", "component": "resid_post", "pooling": "last"}
    assert R.points_towards(spec, {"probes": {1: probe}}) == "class 'faithful' of dataset 'd'"
    task = {"source": "task_vector", "dataset": "t", "task": "sum"}
    assert R.points_towards(task, {}) == "task 'sum' of dataset 't'"
    assert "file" in R.points_towards({"source": "file", "path": "x.npy"}, {})


# ------------------------------------------------------------------------------------------------
# figures


def _effects():
    rows = []
    for a in (-1.0, 0.0, 1.0):
        for m in S.METRICS:
            v = a if m == "logit_diff" else abs(a) / 10
            common = dict(layer=1, alpha=a, metric=m)
            rows.append(
                dict(
                    common,
                    source="probe",
                    direction="probe",
                    value=v,
                    ci_low=v - 0.1,
                    ci_high=v + 0.1,
                    n=12,
                    beyond_random=m == "logit_diff" and a != 0,
                )
            )
            rows.append(
                dict(
                    common,
                    source="random",
                    direction="band",
                    value=0.0,
                    ci_low=-0.2,
                    ci_high=0.2,
                    n=10,
                    beyond_random=None,
                )
            )
    return pd.DataFrame(rows)


def test_steering_figure_says_the_side_of_the_band_and_the_kl_unit():
    fig = plots._draw_steering_dose_response(_effects(), model="demo", experiment="e")
    labels = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert {"above the random band", "below the random band"} <= labels
    assert any("(nats)" in ax.get_ylabel() for ax in fig.axes)
    assert fig._suptitle.get_text().splitlines()[0] == "Steering dose-response: e   (model: demo)"


def test_generation_heatmap_cell_text_reads_at_8pt_on_a_page_and_colorbar_is_right():
    rows = []
    for comp in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        for L in range(6):
            for pos in ("diff", "gen1", "gen2", "gen3", "gen1-2", "gen2-3"):
                row = dict.fromkeys(G.SUMMARY_COLUMNS, 0)
                row.update(component=comp, layer=L, position=pos, n_pairs=16, n_clean=3)
                row.update(position_kind=G.position_kind(pos), recovery_rate=3 / 16)
                rows.append(row)
    fig = pp.draw_generation_heatmap(pd.DataFrame(rows), model="demo", experiment="x")
    width = fig.get_figwidth()
    panels = [ax for ax in fig.axes if ax.images]
    sizes = {t.get_fontsize() for ax in panels for t in ax.texts}
    assert min(sizes) * (17 / 2.54) / width >= 8.0, (sizes, width)
    fig.canvas.draw()
    colorbar = [ax for ax in fig.axes if not ax.images and ax not in panels][-1]
    assert colorbar.get_position().x0 > max(ax.get_position().x1 for ax in panels)
