"""Tests for layerscope.data.datasets: prompt tables from dataset specs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerscope.data import datasets as ds
from layerscope.data.datasets import (
    build_prompt_table,
    parse_bool,
    read_prompt_table,
    write_prompt_table,
)
from layerscope.errors import ConfigError, InputError

CORE = ["prompt_id", "text", "label", "group"]


# ---------------------------------------------------------------------------
# fixture helpers


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def phase2_files(
    tmp_path: Path, n_faithful: int = 12, n_unfaithful: int = 11, variants=("q1", "q2"), **kw
):
    """scores.csv (header line 1, pair p000 on line 2, ...) and responses.jsonl (one line per pair x
    variant)."""
    ids = [f"p{i:03d}" for i in range(n_faithful + n_unfaithful)]
    # interleave classes so that the order is not trivially sorted by class
    labels = []
    f, u = n_faithful, n_unfaithful
    for i in range(len(ids)):
        if (i % 2 == 0 and f) or not u:
            labels.append("True")
            f -= 1
        else:
            labels.append("False")
            u -= 1
    write_csv(
        tmp_path / "scores.csv",
        ["pair_id", "is_faithful", "model"],
        [[p, l, "m1"] for p, l in zip(ids, labels)],
    )
    recs = [
        {"pair_id": p, "variant": v, "question": f"Question {p} {v}?", "response": f"Because {p}."}
        for p in ids
        for v in variants
    ]
    write_jsonl(tmp_path / "responses.jsonl", recs)
    return ids, dict(zip(ids, labels))


def p2spec(**kw) -> dict:
    spec = {"kind": "phase2", "scores": "scores.csv", "responses": "responses.jsonl"}
    spec.update(kw)
    return spec


FACTS_HEADER = ["subject", "relation", "object", "is_true"]
FACT_ROWS = [
    ["Eiffel Tower", "located_in", "Paris", "True"],
    ["Eiffel Tower", "located_in", "Rome", "False"],
    ["Colosseum", "located_in", "Rome", "true"],
    ["Colosseum", "located_in", "Paris", "false"],
    ["France", "capital", "Paris", "1"],
    ["France", "capital", "Lyon", "0"],
    ["Big Ben", "located_in", "London", "TRUE"],
    ["Big Ben", "located_in", "Berlin", "FALSE"],
]
TEMPLATES = {
    "located_in": "The {subject} is located in {object}.",
    "capital": "The capital of {subject} is {object}.",
}


def facts_spec(path="facts.csv", **kw) -> dict:
    spec = {"kind": "facts", "path": path, "templates": dict(TEMPLATES)}
    spec.update(kw)
    return spec


def expect_input_error(fn, *substrings) -> InputError:
    with pytest.raises(InputError) as ei:
        fn()
    msg = str(ei.value)
    for s in substrings:
        assert s in msg, f"{s!r} not in error message: {msg}"
    return ei.value


# ---------------------------------------------------------------------------
# parse_bool


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        ("True", True),
        ("False", False),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        ("FALSE", False),
        (1, True),
        (0, False),
        ("1", True),
        ("0", False),
        (1.0, True),
        (0.0, False),
        ("1.0", True),
        ("0.0", False),
        (" true ", True),
    ],
)
def test_parse_bool_accepts(value, expected):
    assert parse_bool(value) is expected


@pytest.mark.parametrize(
    "value", ["maybe", "", None, float("nan"), 2, -1, 0.5, "yes", "tRuE", [1], "2"]
)
def test_parse_bool_rejects(value):
    with pytest.raises(ValueError, match="is not a boolean"):
        parse_bool(value)


# ---------------------------------------------------------------------------
# phase2: happy paths


def test_phase2_defaults_q1_question(tmp_path):
    ids, labels = phase2_files(tmp_path, 12, 11)
    df, summary = build_prompt_table("p2", p2spec(), tmp_path)
    assert list(df.columns[:4]) == CORE
    assert list(df.columns[4:]) == [
        "pair_id",
        "variant",
        "source_file",
        "source_line",
        "scores_line",
    ]
    # default caps 30/20 keep everything; only q1
    assert len(df) == 23
    assert set(df["variant"]) == {"q1"}
    assert df["prompt_id"].tolist() == [f"{p}:q1" for p in ids]  # scores file order
    assert df["group"].tolist() == ids
    assert df.loc[0, "text"] == "Question p000 q1?"
    assert all(
        df["label"]
        == [("faithful" if labels[p] == "True" else "unfaithful") for p in df["pair_id"]]
    )
    # provenance: responses line of p001:q1 is 3 (two records per pair), scores line is 3
    row = df.set_index("prompt_id").loc["p001:q1"]
    assert (row["source_line"], row["scores_line"], row["source_file"]) == (3, 3, "responses.jsonl")
    assert summary["classes"] == ["unfaithful", "faithful"]
    assert summary["positive_class"] == "faithful"
    assert summary["counts"] == {"unfaithful": 11, "faithful": 12}
    assert summary["n_prompts"] == 23 and summary["n_groups"] == 23
    assert summary["dataset"] == "p2" and summary["kind"] == "phase2"
    assert set(summary["inputs"]) == {"scores.csv", "responses.jsonl"}
    assert all(len(h) == 64 for h in summary["inputs"].values())


def test_phase2_both_variants_share_group_and_question_response(tmp_path):
    ids, _ = phase2_files(tmp_path, 12, 11)
    df, summary = build_prompt_table(
        "p2", p2spec(variants=["q1", "q2"], text="question_response"), tmp_path
    )
    assert len(df) == 46
    assert df["prompt_id"].tolist()[:4] == ["p000:q1", "p000:q2", "p001:q1", "p001:q2"]
    by_group = df.groupby("group")["variant"].apply(list)
    assert all(v == ["q1", "q2"] for v in by_group)
    assert df.groupby("group")["label"].nunique().max() == 1
    assert df.loc[1, "text"] == "Question p000 q2?\nBecause p000."
    assert summary["n_groups"] == 23 and summary["counts"] == {"unfaithful": 22, "faithful": 24}


def test_phase2_caps_per_pair_seeded(tmp_path):
    phase2_files(tmp_path, 30, 25)
    spec = p2spec(
        variants=["q1", "q2"], max_per_class={"faithful": 6, "unfaithful": 5}, min_per_class=2
    )
    df1, s1 = build_prompt_table("p2", spec, tmp_path)
    df1b, _ = build_prompt_table("p2", spec, tmp_path)
    df2, _ = build_prompt_table("p2", {**spec, "seed": 1}, tmp_path)
    assert s1["counts"] == {"unfaithful": 10, "faithful": 12}  # rows: pairs x 2 variants
    assert s1["n_groups"] == 11
    pd.testing.assert_frame_equal(df1, df1b)
    assert set(df1["pair_id"]) != set(df2["pair_id"])
    # both variants of every chosen pair survive; rows stay in scores order
    assert (df1.groupby("pair_id").size() == 2).all()
    assert df1["pair_id"].tolist() == sorted(df1["pair_id"].tolist())


def test_phase2_default_caps_and_single_int_cap(tmp_path):
    phase2_files(tmp_path, 40, 30)
    _, s = build_prompt_table("p2", p2spec(), tmp_path)
    assert s["counts"] == {"unfaithful": 20, "faithful": 30}
    _, s = build_prompt_table("p2", p2spec(max_per_class=12), tmp_path)
    assert s["counts"] == {"unfaithful": 12, "faithful": 12}
    _, s = build_prompt_table("p2", p2spec(max_per_class=None), tmp_path)
    assert s["counts"] == {"unfaithful": 30, "faithful": 40}
    _, s = build_prompt_table(
        "p2", p2spec(max_per_class={"faithful": None, "unfaithful": 11}), tmp_path
    )
    assert s["counts"] == {"unfaithful": 11, "faithful": 40}


def test_phase2_is_faithful_all_forms(tmp_path):
    values = ["True", "False", "true", "false", "TRUE", "FALSE", "1", "0", "1.0", "0.0"]
    ids = [f"{i:03d}" for i in range(len(values))]
    write_csv(
        tmp_path / "scores.csv", ["pair_id", "is_faithful"], [[p, v] for p, v in zip(ids, values)]
    )
    write_jsonl(
        tmp_path / "responses.jsonl",
        [{"pair_id": p, "variant": "q1", "question": "q"} for p in ids],
    )
    df, _ = build_prompt_table("p2", p2spec(min_per_class=1), tmp_path)
    assert df["pair_id"].tolist() == ids  # "001" survives as a string id
    assert df["label"].tolist() == ["faithful", "unfaithful"] * 5
    # JSONL scores with JSON booleans and numbers
    write_jsonl(
        tmp_path / "scores.jsonl",
        [{"pair_id": p, "is_faithful": v} for p, v in zip(ids[:6], [True, False, 1, 0, 1.0, 0.0])],
    )
    write_jsonl(
        tmp_path / "responses.jsonl",
        [{"pair_id": p, "variant": "q1", "question": "q"} for p in ids[:6]],
    )
    df, _ = build_prompt_table("p2", p2spec(scores="scores.jsonl", min_per_class=1), tmp_path)
    assert df["label"].tolist() == ["faithful", "unfaithful"] * 3


def test_phase2_fields_rename_and_filters(tmp_path):
    write_csv(
        tmp_path / "scores.csv",
        ["id", "faithful", "model"],
        [[f"x{i}", str(i % 2), "a" if i < 6 else "b"] for i in range(10)],
    )
    write_jsonl(
        tmp_path / "responses.jsonl",
        [{"id": f"x{i}", "v": "q1", "prompt": f"P{i}"} for i in range(10)],
    )
    spec = p2spec(
        fields={"pair_id": "id", "is_faithful": "faithful", "variant": "v", "question": "prompt"},
        filters={"model": "a"},
        min_per_class=3,
    )
    df, s = build_prompt_table("p2", spec, tmp_path)
    assert df["pair_id"].tolist() == [f"x{i}" for i in range(6)]
    assert df["text"].tolist() == [f"P{i}" for i in range(6)]
    assert s["counts"] == {"unfaithful": 3, "faithful": 3}
    # list filter
    df, _ = build_prompt_table("p2", {**spec, "filters": {"model": ["a", "b"]}}, tmp_path)
    assert len(df) == 10


def test_phase2_min_per_class_default_10(tmp_path):
    phase2_files(tmp_path, 12, 9)
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "min_per_class=10",
        "'unfaithful': 9",
        "'faithful': 12",
    )
    # q1+q2 doubles rows, which passes
    build_prompt_table("p2", p2spec(variants=["q1", "q2"]), tmp_path)


# ---------------------------------------------------------------------------
# phase2: errors


@pytest.mark.parametrize("bad", ["maybe", "", "yes", "2", "nan"])
def test_phase2_bad_is_faithful(tmp_path, bad):
    phase2_files(tmp_path, 12, 11)
    rows = list(csv.reader(open(tmp_path / "scores.csv", encoding="utf-8")))
    rows[3][1] = bad  # data row 3 -> physical line 4
    write_csv(tmp_path / "scores.csv", rows[0], rows[1:])
    err = expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "line 4",
        "field 'is_faithful'",
        f"value {bad!r}",
        "not a boolean",
    )
    assert err.line == 4 and err.field == "is_faithful"


def test_phase2_bad_is_faithful_line_with_multiline_cell(tmp_path):
    # A quoted cell spanning 3 physical lines shifts the line numbers of later rows.
    (tmp_path / "scores.csv").write_text(
        'pair_id,is_faithful,note\np1,True,"a\nb\nc"\np2,maybe,x\n', encoding="utf-8"
    )
    write_jsonl(
        tmp_path / "responses.jsonl",
        [{"pair_id": p, "variant": "q1", "question": "q"} for p in ("p1", "p2")],
    )
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(min_per_class=0), tmp_path),
        "scores.csv",
        "line 5",
        "'is_faithful'",
        "'maybe'",
    )


def test_phase2_missing_scores_column(tmp_path):
    phase2_files(tmp_path)
    write_csv(tmp_path / "scores.csv", ["pair_id", "faithful"], [["p000", "True"]])
    err = expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "field 'is_faithful'",
        "missing",
        "'pair_id', 'faithful'",
    )
    assert err.field == "is_faithful"


def test_phase2_invalid_json_line(tmp_path):
    phase2_files(tmp_path)
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    lines[4] = '{"pair_id": "p002", "variant": "q1", '
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "responses.jsonl",
        "line 5",
        "invalid JSON",
    )


def test_phase2_jsonl_line_not_object(tmp_path):
    phase2_files(tmp_path)
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    lines[2] = '["p001", "q1"]'
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "responses.jsonl",
        "line 3",
        "JSON object",
        "array",
    )


def test_phase2_jsonl_blank_lines_keep_numbering(tmp_path):
    phase2_files(tmp_path, variants=("q1",))
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    lines.insert(1, "")
    lines[5] = '{"pair_id": "p004", "question": "q"}'  # physical line 6, missing variant
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "responses.jsonl",
        "line 6",
        "field 'variant'",
        "missing",
    )


@pytest.mark.parametrize("key", ["pair_id", "question"])
def test_phase2_missing_key_in_record(tmp_path, key):
    phase2_files(tmp_path)
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    rec = json.loads(lines[6])  # p003:q1, line 7
    del rec[key]
    lines[6] = json.dumps(rec)
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "responses.jsonl",
        "line 7",
        f"field '{key}'",
    )


def test_phase2_duplicate_pair_in_scores(tmp_path):
    phase2_files(tmp_path)
    rows = list(csv.reader(open(tmp_path / "scores.csv", encoding="utf-8")))
    rows[6][0] = rows[2][0]  # line 7 repeats the pair on line 3
    write_csv(tmp_path / "scores.csv", rows[0], rows[1:])
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "line 7",
        "'pair_id'",
        "duplicate",
        "p001",
        "line 3",
    )


def test_phase2_duplicate_pair_variant_in_responses(tmp_path):
    phase2_files(tmp_path, variants=("q1", "q2"))
    with open(tmp_path / "responses.jsonl", "a") as f:
        f.write(json.dumps({"pair_id": "p002", "variant": "q2", "question": "again"}) + "\n")
    # p002:q2 is the 6th record; 23 pairs x 2 = 46 lines, the duplicate is line 47
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "responses.jsonl",
        "line 47",
        "duplicate",
        "'p002'",
        "'q2'",
        "first on line 6",
    )


def test_phase2_missing_response_and_orphans(tmp_path):
    ids, _ = phase2_files(tmp_path, variants=("q1",))
    recs = [json.loads(l) for l in (tmp_path / "responses.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["pair_id"] not in ("p003", "p010")]
    recs.append({"pair_id": "zz1", "variant": "q1", "question": "q"})
    write_jsonl(tmp_path / "responses.jsonl", recs)
    err = expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "responses.jsonl",
        "2 scored pair/variant(s)",
        "'p003:q1'",
        "'p010:q1'",
        "1 pair_id(s)",
        "'zz1'",
    )
    assert err.file.endswith("scores.csv")


def test_phase2_orphan_responses_only(tmp_path):
    phase2_files(tmp_path, variants=("q1",))
    with open(tmp_path / "responses.jsonl", "a") as f:
        f.write(json.dumps({"pair_id": "ghost", "variant": "q2", "question": "q"}) + "\n")
    err = expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path),
        "scores.csv",
        "responses.jsonl",
        "1 pair_id(s)",
        "'ghost'",
    )
    assert "scored pair/variant" not in str(err)


def test_phase2_missing_selected_variant(tmp_path):
    phase2_files(tmp_path, variants=("q1",))
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(variants=["q1", "q2"]), tmp_path),
        "23 scored pair/variant(s)",
        "'p000:q2'",
        "more",
    )


def test_phase2_responses_for_filtered_out_pairs_are_not_orphans(tmp_path):
    phase2_files(tmp_path, 12, 11)
    rows = list(csv.reader(open(tmp_path / "scores.csv", encoding="utf-8")))
    rows[1][2] = "m2"
    write_csv(tmp_path / "scores.csv", rows[0], rows[1:])
    df, _ = build_prompt_table("p2", p2spec(filters={"model": "m1"}, min_per_class=5), tmp_path)
    assert "p000" not in set(df["pair_id"]) and len(df) == 22


def test_phase2_question_response_missing_response(tmp_path):
    phase2_files(tmp_path, variants=("q1",))
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    for i, value in ((3, None), (4, "")):
        rec = json.loads(lines[i])
        rec["response"] = value
        lines[i] = json.dumps(rec)
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(text="question_response"), tmp_path),
        "responses.jsonl",
        "line 4",
        "field 'response'",
        "missing or empty",
    )
    # plain question mode does not need responses
    build_prompt_table("p2", p2spec(), tmp_path)
    rec = json.loads(lines[3])
    del rec["response"]  # key absent altogether
    lines[3] = json.dumps(rec)
    lines[4] = json.dumps({**json.loads(lines[4]), "response": "fine"})
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(text="question_response"), tmp_path),
        "line 4",
        "field 'response'",
    )


def test_phase2_empty_files(tmp_path):
    phase2_files(tmp_path)
    (tmp_path / "responses.jsonl").write_text("\n\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path), "responses.jsonl", "empty"
    )
    phase2_files(tmp_path)
    (tmp_path / "scores.csv").write_text("")
    expect_input_error(lambda: build_prompt_table("p2", p2spec(), tmp_path), "scores.csv", "empty")
    (tmp_path / "scores.csv").write_text("pair_id,is_faithful\n")
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path), "scores.csv", "no data rows"
    )


def test_phase2_unknown_text_mode(tmp_path):
    phase2_files(tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.p2\.text.*'answer'"):
        build_prompt_table("p2", p2spec(text="answer"), tmp_path)


def test_phase2_filter_on_unknown_column(tmp_path):
    phase2_files(tmp_path)
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(filters={"dataset": "x"}), tmp_path),
        "scores.csv",
        "field 'dataset'",
        "not found",
        "'model'",
    )


def test_phase2_filter_to_zero_rows(tmp_path):
    phase2_files(tmp_path)
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(filters={"model": "nope"}), tmp_path),
        "scores.csv",
        "leave no rows",
    )


def test_phase2_missing_file(tmp_path):
    phase2_files(tmp_path)
    err = expect_input_error(
        lambda: build_prompt_table("p2", p2spec(responses="nope.jsonl"), tmp_path),
        "nope.jsonl",
        "file not found",
    )
    assert err.file == str(tmp_path / "nope.jsonl")


def test_phase2_bad_caps_config(tmp_path):
    phase2_files(tmp_path)
    with pytest.raises(ConfigError, match=r"max_per_class\.faithfull"):
        build_prompt_table("p2", p2spec(max_per_class={"faithfull": 3}), tmp_path)
    with pytest.raises(ConfigError, match="max_per_class"):
        build_prompt_table("p2", p2spec(max_per_class=-1), tmp_path)
    with pytest.raises(ConfigError, match="min_per_class"):
        build_prompt_table("p2", p2spec(min_per_class="ten"), tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.p2\.fields\.answer"):
        build_prompt_table("p2", p2spec(fields={"answer": "x"}), tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.p2\.scores"):
        build_prompt_table("p2", {"kind": "phase2", "responses": "responses.jsonl"}, tmp_path)


# ---------------------------------------------------------------------------
# encoding and generic file errors


def test_non_utf8_names_file_and_line(tmp_path):
    phase2_files(tmp_path)
    data = (tmp_path / "scores.csv").read_bytes().split(b"\n")
    data[5] = data[5].replace(b"m1", b"caf\xe9")  # Latin-1 byte on physical line 6
    (tmp_path / "scores.csv").write_bytes(b"\n".join(data))
    expect_input_error(
        lambda: build_prompt_table("p2", p2spec(), tmp_path), "scores.csv", "line 6", "UTF-8"
    )


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "facts.csv"
    write_csv(path, FACTS_HEADER, FACT_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    df, _ = build_prompt_table("f", facts_spec(), tmp_path)
    assert len(df) == 8


def test_csv_row_with_wrong_field_count(tmp_path):
    (tmp_path / "facts.csv").write_text(
        "subject,relation,object,is_true\nA,located_in,B,True\nA,located_in,C\n", encoding="utf-8"
    )
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(), tmp_path),
        "facts.csv",
        "line 3",
        "expected 4 fields",
    )


def test_csv_unterminated_quote_names_start_line(tmp_path):
    (tmp_path / "facts.csv").write_text(
        'subject,relation,object,is_true\nA,located_in,B,True\nA,located_in,"C\nD,False\n',
        encoding="utf-8",
    )
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(), tmp_path),
        "facts.csv",
        "line 3",
        "malformed CSV",
    )


def test_unknown_extension(tmp_path):
    (tmp_path / "facts.txt").write_text("x\n")
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(path="facts.txt"), tmp_path),
        "facts.txt",
        "extension",
    )


def test_unknown_kind_and_bad_spec():
    with pytest.raises(ConfigError, match=r"datasets\.x\.kind.*'images'"):
        build_prompt_table("x", {"kind": "images"})
    with pytest.raises(ConfigError, match=r"datasets\.x"):
        build_prompt_table("x", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"datasets\.x\.colour"):
        build_prompt_table(
            "x", {"kind": "task_grid", "tasks": ["sum"], "pairs": [[1, 2]], "colour": 1}
        )


# ---------------------------------------------------------------------------
# facts


def test_facts_csv_happy(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    df, s = build_prompt_table("f", facts_spec(), tmp_path)
    assert list(df.columns) == CORE + [
        "subject",
        "relation",
        "object",
        "source_file",
        "source_line",
    ]
    assert df["prompt_id"].tolist() == [f"fact_{i:04d}" for i in range(8)]
    assert df.loc[0, "text"] == "The Eiffel Tower is located in Paris."
    assert df.loc[4, "text"] == "The capital of France is Paris."
    assert df["label"].tolist() == ["true", "false"] * 4
    assert df.loc[1, "group"] == df.loc[0, "group"] == "Eiffel Tower|located_in"
    assert df["source_line"].tolist() == list(range(2, 10))
    assert s["classes"] == ["false", "true"] and s["positive_class"] == "true"
    assert s["counts"] == {"false": 4, "true": 4} and s["n_groups"] == 4
    assert list(s["inputs"]) == ["facts.csv"]


def test_facts_filter_relation_keeps_ids_stable(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    spec = facts_spec(
        filters={"relation": "located_in"}, templates={"located_in": TEMPLATES["located_in"]}
    )
    df, s = build_prompt_table("f", spec, tmp_path)
    assert set(df["relation"]) == {"located_in"}
    assert df["prompt_id"].tolist() == [
        "fact_0000",
        "fact_0001",
        "fact_0002",
        "fact_0003",
        "fact_0006",
        "fact_0007",
    ]
    assert s["counts"] == {"false": 3, "true": 3}


def test_facts_jsonl_and_caps(tmp_path):
    recs = [
        {"subject": f"S{i}", "relation": "located_in", "object": f"O{i}", "is_true": i % 2 == 0}
        for i in range(40)
    ]
    write_jsonl(tmp_path / "facts.jsonl", recs)
    spec = facts_spec(path="facts.jsonl", max_per_class=5)
    df1, s1 = build_prompt_table("f", spec, tmp_path)
    df2, _ = build_prompt_table("f", {**spec, "seed": 7}, tmp_path)
    assert s1["counts"] == {"false": 5, "true": 5}
    assert df1["prompt_id"].tolist() == sorted(df1["prompt_id"])  # original order kept
    assert df1["prompt_id"].tolist() != df2["prompt_id"].tolist()
    pd.testing.assert_frame_equal(df1, build_prompt_table("f", spec, tmp_path)[0])


def test_facts_relation_without_template(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    expect_input_error(
        lambda: build_prompt_table(
            "f", facts_spec(templates={"located_in": TEMPLATES["located_in"]}), tmp_path
        ),
        "facts.csv",
        "line 6",
        "field 'relation'",
        "'capital'",
        "configured relations",
        "'located_in'",
    )


def test_facts_bad_boolean_and_missing_column(tmp_path):
    rows = [list(r) for r in FACT_ROWS]
    rows[2][3] = "maybe"
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, rows)
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(), tmp_path),
        "facts.csv",
        "line 4",
        "field 'is_true'",
        "'maybe'",
    )
    write_csv(tmp_path / "facts.csv", ["subject", "relation", "object"], [r[:3] for r in FACT_ROWS])
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(), tmp_path),
        "facts.csv",
        "field 'is_true'",
        "missing",
    )
    write_jsonl(
        tmp_path / "facts.jsonl",
        [
            {"subject": "A", "relation": "capital", "object": "B", "is_true": 1},
            {"subject": "A", "relation": "capital", "is_true": 0},
        ],
    )
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(path="facts.jsonl"), tmp_path),
        "facts.jsonl",
        "line 2",
        "field 'object'",
    )


def test_facts_empty_subject(tmp_path):
    rows = [list(r) for r in FACT_ROWS]
    rows[1][0] = ""
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, rows)
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(), tmp_path),
        "facts.csv",
        "line 3",
        "field 'subject'",
        "empty",
    )


def test_facts_bad_template_and_min(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    with pytest.raises(ConfigError, match=r"templates\.capital.*\{country\}"):
        build_prompt_table(
            "f", facts_spec(templates={**TEMPLATES, "capital": "{country} has {object}"}), tmp_path
        )
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(min_per_class=5), tmp_path),
        "facts.csv",
        "min_per_class=5",
        "'false': 4",
    )
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(filters={"is_true": True}), tmp_path),
        "'false': 0",
    )
    df, _ = build_prompt_table(
        "f", facts_spec(filters={"is_true": True}, min_per_class=0), tmp_path
    )
    assert set(df["label"]) == {"true"} and len(df) == 4


def test_facts_filter_unknown_column(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    expect_input_error(
        lambda: build_prompt_table("f", facts_spec(filters={"rel": "capital"}), tmp_path),
        "facts.csv",
        "field 'rel'",
    )


# ---------------------------------------------------------------------------
# task_grid


def test_task_grid_happy():
    spec = {
        "kind": "task_grid",
        "description": "free text is allowed",
        "tasks": ["sum", "product"],
        "pairs": [[25, 9], [42, 11], ["007", 3]],
    }
    df, s = build_prompt_table("tg", spec)
    assert list(df.columns) == CORE + ["task", "a", "b"]
    assert df["prompt_id"].tolist() == [
        "sum:25_9",
        "sum:42_11",
        "sum:007_3",
        "product:25_9",
        "product:42_11",
        "product:007_3",
    ]
    assert df.loc[0, "text"] == "Answer minimally: Given the numbers 25 and 9 calculate the sum"
    assert df["label"].tolist() == ["sum"] * 3 + ["product"] * 3
    assert df["group"].tolist() == ["25_9", "42_11", "007_3"] * 2
    assert s["classes"] == ["product", "sum"] and s["positive_class"] is None
    assert s["n_groups"] == 3 and s["inputs"] == {} and s["counts"] == {"product": 3, "sum": 3}


def test_task_grid_template_filters_caps():
    pairs = [[i, i + 1] for i in range(10)]
    spec = {
        "kind": "task_grid",
        "tasks": ["sum", "diff"],
        "pairs": pairs,
        "template": "{task}({a},{b})=",
    }
    df, _ = build_prompt_table("tg", {**spec, "filters": {"task": "diff"}})
    assert df["text"].tolist()[:2] == ["diff(0,1)=", "diff(1,2)="] and set(df["label"]) == {"diff"}
    df1, s1 = build_prompt_table("tg", {**spec, "max_per_class": {"sum": 3}})
    df2, _ = build_prompt_table("tg", {**spec, "max_per_class": {"sum": 3}, "seed": 5})
    assert s1["counts"] == {"diff": 10, "sum": 3}
    assert df1[df1.task == "sum"]["group"].tolist() != df2[df2.task == "sum"]["group"].tolist()


@pytest.mark.parametrize(
    "change,key",
    [
        ({"template": "{a} {c}"}, "datasets.tg.template"),
        ({"template": "{a:05d}"}, "datasets.tg.template"),
        ({"template": "{a"}, "datasets.tg.template"),
        ({"template": "{} and {b}"}, "datasets.tg.template"),
        ({"seed": -1}, "datasets.tg.seed"),
        ({"tasks": ["sum", "sum"]}, "datasets.tg.tasks[1]"),
        ({"pairs": [[1, 2], [1, 2]]}, "datasets.tg.pairs[1]"),
        ({"pairs": [[1, 2, 3]]}, "datasets.tg.pairs[0]"),
        ({"tasks": []}, "datasets.tg.tasks"),
        ({"filters": {"colour": "red"}}, "datasets.tg.filters.colour"),
        ({"filters": {"task": "nope"}}, "datasets.tg.filters"),
        ({"min_per_class": 3}, "datasets.tg.min_per_class"),
        ({"max_per_class": {"mul": 1}}, "datasets.tg.max_per_class.mul"),
    ],
)
def test_task_grid_config_errors(change, key):
    spec = {"kind": "task_grid", "tasks": ["sum", "product"], "pairs": [[1, 2], [3, 4]], **change}
    with pytest.raises(ConfigError) as ei:
        build_prompt_table("tg", spec)
    assert ei.value.key_path == key


# ---------------------------------------------------------------------------
# labelled


def test_labelled_csv_without_group(tmp_path):
    write_csv(
        tmp_path / "l.csv",
        ["text", "label"],
        [["hello", "pos"], ["bye", "neg"], ["hi", "pos"], ["no", "NA"], ["x", "neg"], ["y", "NA"]],
    )
    df, s = build_prompt_table("lab", {"kind": "labelled", "path": "l.csv"}, tmp_path)
    assert list(df.columns) == CORE + ["source_file", "source_line"]
    assert df["prompt_id"].tolist() == [f"row_{i:04d}" for i in range(6)]
    assert df["group"].tolist() == df["prompt_id"].tolist()
    assert df["label"].tolist() == ["pos", "neg", "pos", "NA", "neg", "NA"]
    assert (
        s["classes"] == ["NA", "neg", "pos"] and s["positive_class"] is None and s["n_groups"] == 6
    )


def test_labelled_jsonl_with_group_and_id(tmp_path):
    recs = [
        {"id": f"{i:03d}", "sentence": f"s{i}", "y": i % 2, "doc": f"d{i // 2}"} for i in range(8)
    ]
    write_jsonl(tmp_path / "l.jsonl", recs)
    spec = {
        "kind": "labelled",
        "path": "l.jsonl",
        "text_field": "sentence",
        "label_field": "y",
        "group_field": "doc",
        "id_field": "id",
    }
    df, s = build_prompt_table("lab", spec, tmp_path)
    assert df["prompt_id"].tolist() == [f"{i:03d}" for i in range(8)]
    assert df["label"].tolist() == ["0", "1"] * 4
    assert df["group"].tolist() == ["d0", "d0", "d1", "d1", "d2", "d2", "d3", "d3"]
    assert s["n_groups"] == 4 and s["counts"] == {"0": 4, "1": 4}
    df, s = build_prompt_table("lab", {**spec, "filters": {"y": 1}, "min_per_class": 1}, tmp_path)
    assert df["prompt_id"].tolist() == ["001", "003", "005", "007"]


def test_labelled_caps(tmp_path):
    write_csv(tmp_path / "l.csv", ["text", "label"], [[f"t{i}", "ab"[i % 2]] for i in range(30)])
    spec = {"kind": "labelled", "path": "l.csv", "max_per_class": {"a": 4}}
    df1, s1 = build_prompt_table("lab", spec, tmp_path)
    df2, _ = build_prompt_table("lab", {**spec, "seed": 3}, tmp_path)
    assert s1["counts"] == {"a": 4, "b": 15}
    assert df1["prompt_id"].tolist() != df2["prompt_id"].tolist()
    assert df1["source_line"].is_monotonic_increasing


@pytest.mark.parametrize(
    "rows,substrings",
    [
        ([["hello", "pos"], ["", "neg"]], ["l.csv", "line 3", "field 'text'", "empty"]),
        ([["hello", "pos"], ["bye", ""]], ["l.csv", "line 3", "field 'label'", "empty"]),
    ],
)
def test_labelled_empty_values(tmp_path, rows, substrings):
    write_csv(tmp_path / "l.csv", ["text", "label"], rows)
    expect_input_error(
        lambda: build_prompt_table("lab", {"kind": "labelled", "path": "l.csv"}, tmp_path),
        *substrings,
    )


def test_labelled_null_and_nan_label_jsonl(tmp_path):
    for bad in ("null", "NaN"):
        (tmp_path / "l.jsonl").write_text(
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n{"text": "c", "label": '
            + bad
            + "}\n"
        )
        expect_input_error(
            lambda: build_prompt_table("lab", {"kind": "labelled", "path": "l.jsonl"}, tmp_path),
            "l.jsonl",
            "line 3",
            "field 'label'",
            "empty",
        )


def test_labelled_duplicate_ids_and_missing_column(tmp_path):
    write_csv(
        tmp_path / "l.csv",
        ["id", "text", "label"],
        [["a1", "x", "p"], ["a2", "y", "p"], ["a1", "z", "q"]],
    )
    spec = {"kind": "labelled", "path": "l.csv", "id_field": "id"}
    expect_input_error(
        lambda: build_prompt_table("lab", spec, tmp_path),
        "l.csv",
        "line 4",
        "field 'id'",
        "duplicate",
        "first on line 2",
    )
    expect_input_error(
        lambda: build_prompt_table("lab", {**spec, "group_field": "doc"}, tmp_path),
        "l.csv",
        "field 'doc'",
        "missing",
    )


def test_labelled_text_must_be_scalar(tmp_path):
    write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "x"}, {"text": ["a"], "label": "x"}])
    expect_input_error(
        lambda: build_prompt_table("lab", {"kind": "labelled", "path": "l.jsonl"}, tmp_path),
        "l.jsonl",
        "line 2",
        "field 'text'",
        "array",
    )


# ---------------------------------------------------------------------------
# write / read


def _labelled_df(tmp_path):
    write_csv(
        tmp_path / "l.csv",
        ["id", "text", "label"],
        [
            ["001", 'multi\nline, "quoted"', "NA"],
            ["002", "None", "None"],
            ["010", "naïve ✓", "NA"],
            ["011", "  spaced ", "None"],
        ],
    )
    return build_prompt_table(
        "lab", {"kind": "labelled", "path": "l.csv", "id_field": "id"}, tmp_path
    )


def test_write_read_round_trip(tmp_path):
    df, summary = _labelled_df(tmp_path)
    write_prompt_table(df, summary, tmp_path / "out" / "t.csv", tmp_path / "out" / "s.json")
    back = read_prompt_table(tmp_path / "out" / "t.csv")
    pd.testing.assert_frame_equal(back, df)
    assert back["prompt_id"].tolist() == ["001", "002", "010", "011"]
    assert back["label"].tolist() == ["NA", "None", "NA", "None"]
    assert back.loc[0, "text"] == 'multi\nline, "quoted"'
    assert back["source_line"].dtype == "int64"
    assert json.loads((tmp_path / "out" / "s.json").read_text()) == summary
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s.json", "t.csv"]


def test_round_trip_phase2_and_task_grid(tmp_path):
    phase2_files(tmp_path, 12, 11)
    for df, s in (
        build_prompt_table("p2", p2spec(variants=["q1", "q2"]), tmp_path),
        build_prompt_table(
            "tg", {"kind": "task_grid", "tasks": ["sum"], "pairs": [[1, 2], ["01", 2]]}
        ),
    ):
        write_prompt_table(df, s, tmp_path / "t.csv", tmp_path / "s.json")
        pd.testing.assert_frame_equal(read_prompt_table(tmp_path / "t.csv"), df)


_cell = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(_cell, _cell, _cell, _cell), min_size=1, max_size=6, unique_by=lambda r: r[0]
    )
)
def test_write_read_round_trip_arbitrary_strings(tmp_path, rows):
    df = pd.DataFrame(rows, columns=CORE)
    df["source_line"] = pd.Series(range(2, 2 + len(rows)), dtype="int64")
    write_prompt_table(df, {"n": len(rows)}, tmp_path / "t.csv", tmp_path / "s.json")
    pd.testing.assert_frame_equal(read_prompt_table(tmp_path / "t.csv"), df)


def test_write_is_atomic(tmp_path, monkeypatch):
    df, summary = _labelled_df(tmp_path)
    out = tmp_path / "out"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ds, "write_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_prompt_table(df, summary, out / "t.csv", out / "s.json")
    assert list(out.iterdir()) == []  # no table, no summary, no temp files
    monkeypatch.undo()

    real_to_csv = pd.DataFrame.to_csv

    def half_then_fail(self, path, *a, **k):
        real_to_csv(self.head(1), path, *a, **k)
        raise OSError("interrupted")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError):
        write_prompt_table(df, summary, out / "t.csv", out / "s.json")
    assert list(out.iterdir()) == []


def test_failed_build_writes_nothing(tmp_path):
    write_csv(tmp_path / "l.csv", ["text", "label"], [["a", "x"], ["", "x"]])
    out = tmp_path / "out"

    def run():
        df, s = build_prompt_table("lab", {"kind": "labelled", "path": "l.csv"}, tmp_path)
        write_prompt_table(df, s, out / "t.csv", out / "s.json")

    with pytest.raises(InputError):
        run()
    assert not out.exists()


@pytest.mark.parametrize(
    "content,substrings",
    [
        ("prompt_id,text,label\na,b,c\n", ["t.csv", "field 'group'", "missing"]),
        (
            "prompt_id,text,label,group\na,t,x,g\nb,t,x,g\na,t,y,h\n",
            ["t.csv", "line 4", "duplicate", "'a'", "line 2"],
        ),
        ("prompt_id,text,label,group\na,t,,g\n", ["t.csv", "line 2", "field 'label'", "empty"]),
        (
            "prompt_id,text,label,group,source_line\na,t,x,g,seven\n",
            ["line 2", "field 'source_line'", "integer"],
        ),
        ("", ["t.csv", "empty"]),
    ],
)
def test_read_prompt_table_errors(tmp_path, content, substrings):
    (tmp_path / "t.csv").write_text(content, encoding="utf-8")
    expect_input_error(lambda: read_prompt_table(tmp_path / "t.csv"), *substrings)


def test_read_prompt_table_missing_file(tmp_path):
    expect_input_error(
        lambda: read_prompt_table(tmp_path / "nope.csv"), "nope.csv", "file not found"
    )


def test_inputs_hash_changes_with_content(tmp_path):
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS)
    _, s1 = build_prompt_table("f", facts_spec(), tmp_path)
    write_csv(tmp_path / "facts.csv", FACTS_HEADER, FACT_ROWS[::-1])
    _, s2 = build_prompt_table("f", facts_spec(), tmp_path)
    assert s1["inputs"]["facts.csv"] != s2["inputs"]["facts.csv"]
    import hashlib

    assert (
        s2["inputs"]["facts.csv"]
        == hashlib.sha256((tmp_path / "facts.csv").read_bytes()).hexdigest()
    )


def test_phase2_response_separator_joins_and_offsets_follow(tmp_path):
    """``response_separator`` is what joins question and response; the offsets move with it."""
    phase2_files(tmp_path, 12, 11, variants=("q1",))
    lines = (tmp_path / "responses.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines if x.strip()]
    for rec in recs:
        rec["response"] += " Answer: 7"
    (tmp_path / "responses.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    spec = p2spec(text="question_response", answer_marker="Answer:")
    for sep in ("\n", " ", " <think> "):
        df, _ = build_prompt_table("p2", {**spec, "response_separator": sep}, tmp_path)
        row = df.iloc[0]
        question = "Question p000 q1?"
        assert row["text"] == question + sep + "Because p000. Answer: 7"
        assert int(row["reasoning_start_char"]) == len(question) + len(sep)
        assert row["text"][int(row["answer_start_char"]) :].strip() == "7"
    expect_config_error = pytest.raises(Exception, match="response_separator")
    with expect_config_error:
        build_prompt_table("p2", {**spec, "response_separator": 3}, tmp_path)
