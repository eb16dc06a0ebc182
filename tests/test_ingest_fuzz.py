"""Fuzzing the ingest of every dataset kind (issue: bad input gets clear errors).

Property: every input, however malformed, EITHER ingests correctly (ids unique, labels in
the allowed set, one row per input record, values preserved, the table survives a
write/read round trip) OR raises :class:`InputError` / :class:`ConfigError` whose message
names the file and, for a fault on a line, that line and the field. Never any other
exception type, and nothing is written on failure.

Each hypothesis test builds a clean random dataset for one *target* (a kind plus the
format of the fuzzed file), injects one *fault* at a known line/field, and checks the
outcome against what the fault must produce. The example-based tests at the end pin the
exact file + line + field for each fault.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerscope.data.datasets import build_prompt_table, read_prompt_table, write_prompt_table
from layerscope.errors import ConfigError, InputError

CORE = ["prompt_id", "text", "label", "group"]
HUGE = 2 * 1024 * 1024  # a 2 MB field
MAX_MESSAGE = 2000  # an error message never dumps a huge value
BREAK = re.compile(r"\r\n|\r|\n")  # CSV physical lines (as Python's csv module counts them)
TEMPLATES = {"r1": "{subject} is r1 of {object}.", "r2": "{object} has r2: {subject}"}

TRUE_STR = ("True", "true", "TRUE", "1", "1.0")
FALSE_STR = ("False", "false", "FALSE", "0", "0.0")


# ---------------------------------------------------------------------------
# targets: one kind + the format of the file being fuzzed


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    fmt: str  # csv, tsv or jsonl (the fuzzed file)
    fname: str
    columns: tuple[str, ...]
    id_col: str  # an id-like column (Unicode faults)
    text_col: str  # a free-text column (huge / Unicode faults)
    label_col: str | None  # the label / truth column, if in this file
    used: tuple[str, ...]  # columns the builder reads
    required: tuple[str, ...]  # order in which a missing column is reported

    @property
    def delim(self) -> str:
        return "\t" if self.fmt == "tsv" else ","

    @property
    def scores_target(self) -> bool:
        return self.name.startswith("phase2_scores")


LAB = ("id", "text", "label", "note")
FACTS = ("subject", "relation", "object", "is_true")
SCORES = ("pair_id", "is_faithful", "model")
RESP = ("pair_id", "variant", "question", "response")

TARGETS = {
    t.name: t
    for t in [
        Target(
            "labelled_csv",
            "labelled",
            "csv",
            "data.csv",
            LAB,
            "id",
            "text",
            "label",
            LAB[:3],
            ("text", "label", "id"),
        ),
        Target(
            "labelled_tsv",
            "labelled",
            "tsv",
            "data.tsv",
            LAB,
            "id",
            "text",
            "label",
            LAB[:3],
            ("text", "label", "id"),
        ),
        Target(
            "labelled_jsonl",
            "labelled",
            "jsonl",
            "data.jsonl",
            LAB,
            "id",
            "text",
            "label",
            LAB[:3],
            (),
        ),
        Target(
            "facts_csv",
            "facts",
            "csv",
            "facts.csv",
            FACTS,
            "subject",
            "object",
            "is_true",
            FACTS,
            FACTS,
        ),
        Target(
            "facts_jsonl",
            "facts",
            "jsonl",
            "facts.jsonl",
            FACTS,
            "subject",
            "object",
            "is_true",
            FACTS,
            (),
        ),
        Target(
            "phase2_scores_csv",
            "phase2",
            "csv",
            "scores.csv",
            SCORES,
            "pair_id",
            "model",
            "is_faithful",
            SCORES[:2],
            SCORES[:2],
        ),
        Target(
            "phase2_scores_jsonl",
            "phase2",
            "jsonl",
            "scores.jsonl",
            SCORES,
            "pair_id",
            "model",
            "is_faithful",
            SCORES[:2],
            (),
        ),
        Target(
            "phase2_responses",
            "phase2",
            "jsonl",
            "responses.jsonl",
            RESP,
            "pair_id",
            "question",
            None,
            RESP[:3],
            (),
        ),
    ]
}
CSV_TARGETS = [n for n, t in TARGETS.items() if t.fmt in ("csv", "tsv")]
JSONL_TARGETS = [n for n, t in TARGETS.items() if t.fmt == "jsonl"]


def spec_for(t: Target) -> dict:
    if t.kind == "labelled":
        return {"kind": "labelled", "path": t.fname, "id_field": "id", "min_per_class": 0}
    if t.kind == "facts":
        return {"kind": "facts", "path": t.fname, "templates": dict(TEMPLATES), "min_per_class": 0}
    scores = t.fname if t.scores_target else "scores.csv"
    return {
        "kind": "phase2",
        "scores": scores,
        "responses": "responses.jsonl",
        "min_per_class": 0,
        "max_per_class": None,
    }


def as_bool(v) -> bool | None:
    """The truth value the ingest must read from ``v`` (None: not a boolean)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        if v.strip() in TRUE_STR:
            return True
        if v.strip() in FALSE_STR:
            return False
    return None


# ---------------------------------------------------------------------------
# serialisation with known line numbers


def csv_cell(value: str, delim: str) -> str:
    """Minimal quoting; a '"' inside an unquoted value is written as is (and read back as is)."""
    if value.startswith('"') or any(c in value for c in (delim, "\r", "\n")):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_render(raw_rows: list[list[str]], delim: str) -> tuple[str, list[int]]:
    """Join already-quoted cells; return the text and the physical line each row starts on."""
    parts, starts, line = [], [], 1
    for cells in raw_rows:
        starts.append(line)
        s = delim.join(cells) + "\n"
        parts.append(s)
        line += len(BREAK.findall(s))
    return "".join(parts), starts


def csv_rows(t: Target, recs: list[dict]) -> list[list[str]]:
    return [list(t.columns)] + [[csv_cell(str(r[c]), t.delim) for c in t.columns] for r in recs]


def jsonl_render(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------------------
# cases


@dataclass
class Case:
    recs: list[dict]  # the records as the ingest must see them (exact checks, companion file)
    data: bytes  # the fuzzed file
    outcome: str  # "exact": must ingest and match recs; "error": must raise
    line: int | None = None  # expected error line
    field: str | None = None  # expected error field
    words: tuple[str, ...] = ()  # expected (case-insensitive) substrings of the message
    lines: list[int] | None = None  # the line of each record (exact checks)
    truths: list[bool] | None = None  # the scores of a phase2 responses target


SAFE = st.text(alphabet=string.ascii_letters + string.digits + " .-_", max_size=8)
WEIRD = st.sampled_from(
    [
        "\U0001f600",
        "\U0001f469\u200d\U0001f469\u200d\U0001f467",
        "\u202e",
        "\u200f",
        "\u05e9\u05dc\u05d5\u05dd",
        "\u0645\u0631\u062d\u0628\u0627",
        "e\u0301",
        "\u0300",
        "\x00",
        "\n",
        "\r\n",
        "\r",
        "\u2028",
        "\u2029",
        "\ufeff",
        "\u200b",
        "\t",
        '"',
        ",",
        "\\",
        "{",
        "}",
        "'",
        "\U0001d518",
        "\x85",
        "\x1c",
        " ",
        "\u00a0",
    ]
)
UNICODE = st.lists(
    st.one_of(WEIRD, st.characters(blacklist_categories=("Cs",))), min_size=1, max_size=6
).map("".join)

CSV_LABELS = [  # value, as a labelled label (None: must fail), as a truth value
    ("", None, None),
    (" ", None, None),
    ("\u00a0", None, None),
    ("nan", "nan", None),
    ("NaN", "NaN", None),
    ("None", "None", None),
    ("null", "null", None),
    ("NA", "NA", None),
    ("N/A", "N/A", None),
    ("yes", "yes", None),
    ("2", "2", None),
    ("tRuE", "tRuE", None),
    (" true ", " true ", True),
    ("1.0", "1.0", True),
    ("0", "0", False),
]
JSON_LABELS = [  # raw JSON token, as a labelled label, as a truth value
    ("null", None, None),
    ("NaN", None, None),
    ('""', None, None),
    ('"  "', None, None),
    ('"nan"', "nan", None),
    ('"None"', "None", None),
    ('"NA"', "NA", None),
    ("Infinity", "inf", None),
    ("-Infinity", "-inf", None),
    ("1.5", "1.5", None),
    ("2", "2", None),
    ("true", "true", True),
    ("false", "false", False),
    ("1", "1", True),
    ("0", "0", False),
    ("0.0", "0.0", False),
    ('"True"', "True", True),
    ("[]", None, None),
    ('{"v": 1}', None, None),
    ('["pos"]', None, None),
]


@st.composite
def base(draw, t: Target) -> tuple[list[dict], list[bool]]:
    n = draw(st.integers(2, 5))
    recs, truths = [], []
    for i in range(n):
        truth = draw(st.booleans())
        truths.append(truth)
        if t.fmt == "jsonl":
            tv = draw(
                st.sampled_from(
                    [True, 1, "true", "True", "1"] if truth else [False, 0, "false", "FALSE", "0"]
                )
            )
        else:
            tv = draw(st.sampled_from(TRUE_STR if truth else FALSE_STR))
        if t.kind == "labelled":
            r = {
                "id": f"r{i}",
                "text": "T" + draw(SAFE),
                "label": draw(st.sampled_from(["pos", "neg", "NA", "0", "1"])),
                "note": "n" + draw(SAFE),
            }
        elif t.kind == "facts":
            r = {
                "subject": "S" + draw(SAFE),
                "relation": draw(st.sampled_from(["r1", "r2"])),
                "object": "O" + draw(SAFE),
                "is_true": tv,
            }
        elif t.scores_target:
            r = {"pair_id": f"p{i}", "is_faithful": tv, "model": "m" + draw(SAFE)}
        else:
            r = {
                "pair_id": f"p{i}",
                "variant": "q1",
                "question": "Q" + draw(SAFE),
                "response": "A" + draw(SAFE),
            }
        recs.append(r)
    return recs, truths


def oracle_labels(values: list) -> list[str] | None:
    """The documented label rule, written independently of layerscope: stripped text, booleans
    (any casing, JSON booleans, and 0/1 beside them) as true/false, numbers compared as numbers.
    None when the column mixes booleans with text or with numbers other than 0/1 (refused)."""
    typed = []
    for v in values:
        if isinstance(v, bool):
            typed.append(("b", v))
        elif isinstance(v, (int, float)):
            typed.append(("n", float(v)))
        elif v.strip().lower() in ("true", "false"):
            typed.append(("b", v.strip().lower() == "true"))
        elif (
            v.strip()
            and set(v.strip()) <= set("0123456789+-.eE")
            and _float_or_none(v.strip()) is not None
        ):
            typed.append(("n", float(v.strip())))
        else:
            typed.append(("t", v.strip()))
    kinds = {k for k, _ in typed}
    if "b" in kinds and ("t" in kinds or any(k == "n" and x not in (0.0, 1.0) for k, x in typed)):
        return None
    as_bool = "b" in kinds
    return [
        ("true" if x else "false")
        if k == "b" or (as_bool and k == "n")
        else (str(int(x)) if x.is_integer() else repr(x))
        if k == "n"
        else x
        for k, x in typed
    ]


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def labelled_case(t: Target, recs: list[dict], raw_labels: list, done, rendered, line=None):
    """An 'exact' case whose expected labels follow the label rule, or the refusal of a mixed
    column."""
    expected = oracle_labels(raw_labels)
    if expected is None:
        return done(rendered, line=None, field=t.label_col, words=("mix", f"line {line}"))
    for r, label in zip(recs, expected):
        r[t.label_col] = label
    return done(rendered, "exact")


def bad_label_outcome(t: Target, as_label, as_truth):
    """(must_fail, expected stored value) for a label fault."""
    if t.kind == "labelled":
        return as_label is None, as_label
    return as_truth is None, as_truth


CSV_FAULTS = [
    "unterminated_quote",
    "text_after_closing_quote",
    "stray_quote_in_unquoted_value",
    "too_few_fields",
    "too_many_fields",
    "missing_header",
    "duplicate_header",
    "bom",
    "latin1_byte",
    "utf16_bom",
    "utf16_no_bom",
    "empty_file",
    "whitespace_only_file",
    "huge_field",
    "bad_label",
    "unicode_ids_and_texts",
]


def whole_file_fault(draw, fault: str, content, done, recs, truths, blanks) -> Case | None:
    """The faults of the file as a whole, alike for CSV and JSONL: wide encodings, empty files.
    ``content`` is what ``done`` renders (rows or lines); None for any other fault."""
    if fault == "utf16_bom":
        codec = draw(st.sampled_from(["utf-16", "utf-32"]))
        return done(content, line=1, words=("UTF",), enc=lambda s: s.encode(codec))
    if fault == "utf16_no_bom":
        codec = draw(st.sampled_from(["utf-16-le", "utf-16-be"]))
        return done(content, line=1, words=("UTF-16",), enc=lambda s: s.encode(codec))
    if fault == "empty_file":
        return Case(recs, b"", "error", words=("empty",), truths=truths)
    if fault == "whitespace_only_file":
        ws = draw(st.lists(st.sampled_from(blanks), min_size=1, max_size=8))
        return Case(recs, "".join(ws).encode(), "error", words=("empty",), truths=truths)
    return None


@st.composite
def csv_case(draw, t: Target, fault: str) -> Case:
    recs, truths = draw(base(t))
    n, cols, d = len(recs), list(t.columns), t.delim
    i = draw(st.integers(0, n - 1))
    j = draw(st.integers(0, len(cols) - 1))

    def done(rows, outcome="error", line=None, field=None, words=(), enc=None):
        text, starts = csv_render(rows, d)
        data = enc(text) if enc else text.encode("utf-8")
        return Case(recs, data, outcome, line, field, words, lines=starts[1:], truths=truths)

    rows = csv_rows(t, recs)
    _, starts = csv_render(rows, d)
    row_line = starts[i + 1]
    if fault == "unterminated_quote":
        rows[i + 1][j] = '"' + rows[i + 1][j]
        return done(rows, line=row_line, field=cols[j], words=("quote",))
    if fault == "text_after_closing_quote":
        junk = draw(st.sampled_from(["x", " ", "\u00e9", "'", "1"])) + draw(SAFE)
        rows[i + 1][j] = '"' + rows[i + 1][j] + '"' + junk
        return done(rows, line=row_line, field=cols[j], words=("quote",))
    if fault == "stray_quote_in_unquoted_value":
        c = t.text_col
        recs[i][c] = recs[i][c][:1] + '"' + recs[i][c][1:] + draw(st.sampled_from(['"', "", '""']))
        return done(csv_rows(t, recs), "exact")
    if fault == "too_few_fields":
        k = draw(st.integers(1, len(cols) - 1))
        rows[i + 1] = rows[i + 1][:k]
        return done(rows, line=row_line, field=cols[k], words=(f"expected {len(cols)} fields",))
    if fault == "too_many_fields":
        rows[i + 1] += draw(st.lists(SAFE, min_size=1, max_size=3))
        return done(
            rows, line=row_line, words=(f"expected {len(cols)} fields", f"column {len(cols) + 1}")
        )
    if fault == "missing_header":
        return done(rows[1:], line=1, field=t.required[0], words=("missing", "columns found"))
    if fault == "duplicate_header":
        a, b = sorted(
            draw(st.lists(st.integers(0, len(cols) - 1), min_size=2, max_size=2, unique=True))
        )
        rows[0][b] = rows[0][a]
        return done(rows, line=1, field=cols[a], words=("duplicate",))
    if fault == "bom":
        return done(rows, "exact", enc=lambda s: b"\xef\xbb\xbf" + s.encode("utf-8"))
    if fault == "latin1_byte":
        byte = bytes([draw(st.integers(0x80, 0xFF))])
        rows[i + 1][j] = rows[i + 1][j] + "\ue000x"
        return done(
            rows,
            line=row_line,
            field=cols[j],
            words=("UTF-8",),
            enc=lambda s: s.encode("utf-8").replace("\ue000".encode("utf-8"), byte),
        )
    whole = whole_file_fault(draw, fault, rows, done, recs, truths, [" ", "\t", "\n", "\r\n", "\r"])
    if whole is not None:
        return whole
    if fault == "huge_field":
        c = draw(st.sampled_from([t.text_col, t.id_col, t.label_col]))
        recs[i][c] = recs[i][c] + "x" * HUGE
        if c == t.label_col and t.kind != "labelled":
            return done(csv_rows(t, recs), line=row_line, field=c, words=("not a boolean",))
        return done(csv_rows(t, recs), "exact")
    if fault == "bad_label":
        value, as_label, as_truth = draw(st.sampled_from(CSV_LABELS))
        recs[i][t.label_col] = value
        fails, _ = bad_label_outcome(t, as_label, as_truth)
        if fails:
            return done(csv_rows(t, recs), line=row_line, field=t.label_col)
        if t.kind == "labelled":
            return labelled_case(
                t, recs, [r[t.label_col] for r in recs], done, csv_rows(t, recs), row_line
            )
        return done(csv_rows(t, recs), "exact")
    if fault == "unicode_ids_and_texts":
        recs[i][t.id_col] = recs[i][t.id_col] + ":" + draw(UNICODE)
        recs[i][t.text_col] = recs[i][t.text_col] + draw(UNICODE)
        if draw(
            st.booleans()
        ):  # a second row, so that line numbers after a multi-line cell are checked
            k = draw(st.integers(0, n - 1))
            recs[k][t.text_col] = recs[k][t.text_col] + draw(UNICODE)
        return done(csv_rows(t, recs), "exact")
    raise AssertionError(fault)


JSONL_FAULTS = [
    "truncated_object",
    "non_object_line",
    "array_line",
    "nested_value",
    "trailing_garbage",
    "latin1_byte",
    "utf16_bom",
    "utf16_no_bom",
    "empty_file",
    "whitespace_only_file",
    "huge_string",
    "huge_number",
    "deep_nesting",
    "bad_label",
    "unicode_ids_and_texts",
    "raw_control_char",
    "lone_surrogate",
    "duplicate_key",
]
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.text(max_size=4))
NESTED = st.one_of(
    st.lists(JSON_LEAF, max_size=3),
    st.dictionaries(st.text(max_size=3), JSON_LEAF, max_size=3),
    st.recursive(
        st.lists(JSON_LEAF, max_size=2),
        lambda ch: st.lists(ch, max_size=2) | st.dictionaries(st.text(max_size=2), ch, max_size=2),
        max_leaves=6,
    ),
)


@st.composite
def jsonl_case(draw, t: Target, fault: str) -> Case:
    recs, truths = draw(base(t))
    n, cols = len(recs), list(t.columns)
    i = draw(st.integers(0, n - 1))
    col = draw(st.sampled_from(cols))
    str_cols = [c for c in cols if all(isinstance(r[c], str) for r in recs)]
    scol = draw(st.sampled_from(str_cols))
    lines = [json.dumps(r) for r in recs]
    line = i + 1

    def done(lines, outcome="error", line=line, field=None, words=(), enc=None):
        text = jsonl_render(lines)
        data = enc(text) if enc else text.encode("utf-8")
        return Case(
            recs,
            data,
            outcome,
            line if outcome == "error" else None,
            field,
            words,
            lines=list(range(1, n + 1)),
            truths=truths,
        )

    def with_token(c: str, token: str, ensure_ascii: bool = True) -> str:
        r = dict(recs[i])
        r[c] = "\ue0ff"
        return json.dumps(r, ensure_ascii=ensure_ascii).replace(
            json.dumps("\ue0ff", ensure_ascii=ensure_ascii), token
        )

    if fault == "truncated_object":
        cut = draw(st.integers(1, len(lines[i]) - 1))
        lines[i] = lines[i][:cut]
        return done(lines, words=("JSON",))
    if fault == "non_object_line":
        lines[i] = draw(
            st.sampled_from(["null", "true", "1", "-2.5", '"a string"', '"{\\"id\\": 1}"'])
        )
        return done(lines, words=("JSON object",))
    if fault == "array_line":
        lines[i] = json.dumps(list(recs[i].values()) if draw(st.booleans()) else [recs[i]])
        return done(lines, words=("array",))
    if fault == "nested_value":
        c = draw(st.sampled_from(t.used))
        lines[i] = with_token(c, json.dumps(draw(NESTED)))
        return done(lines, field=c)
    if fault == "trailing_garbage":
        junk = draw(
            st.sampled_from(["x", "}", "]", ",", "{}", "[]", "1", '"a"', "//c", "#", ', "k": 1}'])
        )
        lines[i] = lines[i] + draw(st.sampled_from(["", " "])) + junk
        return done(lines, words=("column",))
    if fault == "latin1_byte":
        byte = bytes([draw(st.integers(0x80, 0xFF))])
        lines[i] = with_token(scol, '"T\ue000x"', ensure_ascii=False)
        return done(
            lines,
            field=scol,
            words=("UTF-8",),
            enc=lambda s: s.encode("utf-8").replace("\ue000".encode("utf-8"), byte),
        )
    whole = whole_file_fault(draw, fault, lines, done, recs, truths, [" ", "\t", "\n", "\r\n"])
    if whole is not None:
        return whole
    if fault == "huge_string":
        c = draw(st.sampled_from([t.text_col, t.id_col]))
        recs[i][c] = recs[i][c] + "y" * HUGE
        return done([json.dumps(r) for r in recs], "exact")
    if fault == "huge_number":
        lines[i] = with_token(
            col, draw(st.sampled_from(["", "-"])) + "7" * draw(st.integers(4400, 20000))
        )
        return done(lines, field=col, words=("number",))
    if fault == "deep_nesting":
        depth = draw(st.sampled_from([5000, 100000]))
        o, c_ = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        lines[i] = with_token(col, o * depth + "1" + c_ * depth)
        return done(lines, field=col, words=("nested",))
    if fault == "bad_label":
        token, as_label, as_truth = draw(st.sampled_from(JSON_LABELS))
        lines[i] = with_token(t.label_col, token)
        fails, expected = bad_label_outcome(t, as_label, as_truth)
        if fails:
            return done(lines, field=t.label_col)
        if t.kind == "labelled":
            raw = [json.loads(token) if k == i else r[t.label_col] for k, r in enumerate(recs)]
            return labelled_case(t, recs, raw, done, lines, i + 1)
        recs[i][t.label_col] = expected
        return done(lines, "exact")
    if fault == "unicode_ids_and_texts":
        recs[i][t.id_col] = recs[i][t.id_col] + ":" + draw(UNICODE)
        recs[i][t.text_col] = recs[i][t.text_col] + draw(UNICODE)
        ensure_ascii = draw(st.booleans())
        return done([json.dumps(r, ensure_ascii=ensure_ascii) for r in recs], "exact")
    if fault == "raw_control_char":
        ch = chr(draw(st.sampled_from([c for c in range(32) if c != 10])))
        lines[i] = with_token(scol, '"T' + ch + 'x"', ensure_ascii=False)
        return done(lines, field=scol, words=("control character",))
    if fault == "lone_surrogate":
        esc = draw(st.sampled_from(["\\ud800", "\\udfff", "\\ud83d", "\\udc00x"]))
        lines[i] = with_token(scol, '"T' + esc + '"')
        return done(lines, field=scol, words=("surrogate",))
    if fault == "duplicate_key":
        lines[i] = lines[i][:-1] + f", {json.dumps(col)}: " + json.dumps(draw(JSON_LEAF)) + "}"
        return done(lines, field=col, words=("duplicate",))
    raise AssertionError(fault)


# ---------------------------------------------------------------------------
# running a case


def companion_files(t: Target, case: Case) -> dict[str, bytes]:
    if t.scores_target:
        ids = [
            r["pair_id"] if isinstance(r["pair_id"], str) else f"p{k}"
            for k, r in enumerate(case.recs)
        ]
        return {
            "responses.jsonl": jsonl_render(
                [
                    json.dumps({"pair_id": p, "variant": "q1", "question": f"Q{k}"})
                    for k, p in enumerate(ids)
                ]
            ).encode()
        }
    if t.name == "phase2_responses":
        rows = [["pair_id", "is_faithful"]] + [
            [
                csv_cell(r["pair_id"] if isinstance(r["pair_id"], str) else f"p{k}", ","),
                str(case.truths[k]),
            ]
            for k, r in enumerate(case.recs)
        ]
        return {"scores.csv": csv_render(rows, ",")[0].encode()}
    return {}


def expected_rows(t: Target, case: Case) -> list[tuple[str, str, str, int]]:
    out = []
    for k, r in enumerate(case.recs):
        line = case.lines[k]
        if t.kind == "labelled":
            out.append((r["id"], r["text"], r["label"], line))
        elif t.kind == "facts":
            text = TEMPLATES[r["relation"]].format(subject=r["subject"], object=r["object"])
            out.append((f"fact_{k:04d}", text, "true" if as_bool(r["is_true"]) else "false", line))
        elif t.scores_target:
            label = "faithful" if as_bool(r["is_faithful"]) else "unfaithful"
            out.append((f"{r['pair_id']}:q1", f"Q{k}", label, line))
        else:
            label = "faithful" if case.truths[k] else "unfaithful"
            out.append((f"{r['pair_id']}:q1", r["question"], label, line))
    return out


def check_error(err: Exception, t: Target, case: Case, paths: dict[str, Path]) -> None:
    msg = str(err)
    assert "Traceback" not in msg
    assert len(msg) <= MAX_MESSAGE, f"message of {len(msg)} chars"
    if isinstance(err, ConfigError):
        assert err.key_path.startswith("datasets.ds"), msg
        return
    assert err.file is not None, f"error names no file: {msg}"
    assert err.file in {str(p) for p in paths.values()}, msg
    assert msg.startswith(err.file), msg
    if err.line is not None:
        assert f"line {err.line}" in msg
    if case.outcome == "error":
        assert err.file == str(paths[t.fname]), msg
        if case.line is not None:
            assert err.line == case.line and f"line {case.line}" in msg, (
                f"expected line {case.line}: {msg}"
            )
        if case.field is not None:
            assert err.field == case.field and f"field '{case.field}'" in msg, (
                f"expected field {case.field!r}: {msg}"
            )
        for w in case.words:
            assert w.lower() in msg.lower(), f"{w!r} not in {msg}"


def check_table(df: pd.DataFrame, summary: dict, t: Target, case: Case, tmp: Path) -> None:
    assert list(df.columns[:4]) == CORE
    assert df["prompt_id"].is_unique
    if t.kind == "labelled":
        allowed = {r["label"] for r in case.recs}
    else:
        allowed = {"true", "false"} if t.kind == "facts" else {"faithful", "unfaithful"}
    assert set(df["label"]) <= allowed
    assert len(df) == len(case.recs) == summary["n_prompts"]
    assert sum(summary["counts"].values()) == len(df)
    for col in df.columns:
        if col not in ("source_line", "scores_line"):
            for v in df[col]:
                v.encode("utf-8")  # every string can be written out
    assert df["text"].map(lambda s: s.strip() != "").all()
    if case.outcome == "exact":
        exp = expected_rows(t, case)
        line_col = "scores_line" if t.scores_target else "source_line"
        assert df["prompt_id"].tolist() == [e[0] for e in exp]
        assert df["text"].tolist() == [e[1] for e in exp]
        assert df["label"].tolist() == [e[2] for e in exp]
        assert df[line_col].tolist() == [e[3] for e in exp]
    out = tmp / "out"
    write_prompt_table(df, summary, out / "t.csv", out / "s.json")
    pd.testing.assert_frame_equal(read_prompt_table(out / "t.csv"), df)


def run_case(t: Target, case: Case) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ingest_fuzz_"))
    try:
        files = {t.fname: case.data, **companion_files(t, case)}
        paths = {}
        for name, data in files.items():
            paths[name] = tmp / name
            paths[name].write_bytes(data)
        try:
            df, summary = build_prompt_table("ds", spec_for(t), tmp)
        except (InputError, ConfigError) as err:
            assert case.outcome == "error", f"valid input rejected: {err}"
            check_error(err, t, case, paths)
            assert sorted(os.listdir(tmp)) == sorted(files), "a failed ingest left files behind"
            return
        assert case.outcome != "error", (
            f"bad input accepted (expected an error on line {case.line}, field {case.field})"
        )
        check_table(df, summary, t, case, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# fewer examples where there is little to vary or each example is big
EXAMPLES = {
    "empty_file": 3,
    "huge_field": 4,
    "huge_string": 4,
    "huge_number": 6,
    "deep_nesting": 6,
    "utf16_bom": 6,
    "utf16_no_bom": 6,
}
DEFAULT_EXAMPLES = 12
FUZZ = settings(
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@pytest.mark.parametrize("fault", CSV_FAULTS)
@pytest.mark.parametrize("target", CSV_TARGETS)
def test_fuzz_csv(target, fault):
    t = TARGETS[target]

    @settings(FUZZ, max_examples=EXAMPLES.get(fault, DEFAULT_EXAMPLES))
    @given(case=csv_case(t, fault))
    def run(case):
        run_case(t, case)

    run()


@pytest.mark.parametrize(
    "target,fault",
    # the labels of a phase2 dataset live in its scores file, not in the responses
    [
        (t, f)
        for t in JSONL_TARGETS
        for f in JSONL_FAULTS
        if not (f == "bad_label" and TARGETS[t].label_col is None)
    ],
)
def test_fuzz_jsonl(target, fault):
    t = TARGETS[target]

    @settings(FUZZ, max_examples=EXAMPLES.get(fault, DEFAULT_EXAMPLES))
    @given(case=jsonl_case(t, fault))
    def run(case):
        run_case(t, case)

    run()


TG_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**20),
    st.floats(),
    st.text(max_size=4),
    st.lists(st.integers(0, 5), max_size=3),
    st.dictionaries(st.text(max_size=2), st.integers(-1, 3), max_size=2),
)
TG_NAME = st.one_of(st.sampled_from(["sum", "product", "diff"]), UNICODE, TG_ANY)
TG_PAIR = st.one_of(
    st.lists(st.one_of(st.integers(-5, 99), st.text(max_size=3), TG_ANY), min_size=2, max_size=2),
    TG_ANY,
)


@settings(FUZZ, max_examples=80)
@given(
    tasks=st.one_of(st.lists(TG_NAME, min_size=1, max_size=4), TG_ANY),
    pairs=st.one_of(st.lists(TG_PAIR, min_size=1, max_size=4), TG_ANY),
    extra=st.dictionaries(
        st.sampled_from(["template", "max_per_class", "min_per_class", "seed", "filters", "bogus"]),
        st.one_of(
            TG_ANY,
            st.sampled_from(["{task}: {a}+{b}", "{a} {c}", "{a", "{}", "{a!z}"]),
            st.dictionaries(st.sampled_from(["task", "a", "sum", "label"]), TG_ANY, max_size=2),
        ),
        max_size=3,
    ),
)
def test_fuzz_task_grid_config(tasks, pairs, extra):
    """task_grid reads no file: any spec either builds a consistent grid or raises ConfigError."""
    spec = {"kind": "task_grid", "tasks": tasks, "pairs": pairs, **extra}
    try:
        df, summary = build_prompt_table("tg", spec)
    except ConfigError as err:
        assert err.key_path.startswith("datasets.tg"), str(err)
        return
    assert df["prompt_id"].is_unique
    assert set(df["label"]) <= set(tasks)
    assert summary["n_prompts"] == len(df) <= len(tasks) * len(pairs)
    if not {"filters", "max_per_class"} & set(extra):
        assert len(df) == len(tasks) * len(pairs)


# ---------------------------------------------------------------------------
# example-based: the exact file + line + field for each fault


def build(tmp_path: Path, name: str, content: str | bytes, **spec):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if not spec:
        spec = {"kind": "labelled", "path": name, "min_per_class": 0}
    return build_prompt_table("ds", spec, tmp_path)


def expect(tmp_path, name, content, line, field, *words, **spec) -> InputError:
    with pytest.raises(InputError) as ei:
        build(tmp_path, name, content, **spec)
    err, msg = ei.value, str(ei.value)
    assert err.file == str(tmp_path / name) and msg.startswith(str(tmp_path / name)), msg
    assert err.line == line, msg
    if line is not None:
        assert f"line {line}" in msg
    assert err.field == field, msg
    if field is not None:
        assert f"field '{field}'" in msg
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in {msg}"
    assert len(msg) <= MAX_MESSAGE
    return err


LAB_CSV = "id,text,label\na,hello,pos\n"
FACTS_SPEC = {"kind": "facts", "path": "facts.csv", "templates": TEMPLATES, "min_per_class": 0}


def test_csv_unterminated_quote(tmp_path):
    expect(tmp_path, "data.csv", LAB_CSV + 'b,"oops,neg\nc,bye,neg\n', 3, "text", "quote")


def test_csv_text_after_closing_quote(tmp_path):
    expect(
        tmp_path,
        "facts.csv",
        'subject,relation,object,is_true\nA,r1,"Paris"x,True\n',
        2,
        "object",
        "quote",
        **FACTS_SPEC,
    )


def test_csv_too_few_fields(tmp_path):
    expect(tmp_path, "data.csv", LAB_CSV + "b,bye\n", 3, "label", "expected 3 fields", "found 2")


def test_csv_too_many_fields(tmp_path):
    expect(
        tmp_path,
        "data.csv",
        LAB_CSV + "b,bye,neg,extra\n",
        3,
        None,
        "expected 3 fields",
        "found 4",
        "column 4",
    )


def test_csv_missing_header(tmp_path):
    expect(
        tmp_path,
        "data.csv",
        "a,hello,pos\nb,bye,neg\n",
        1,
        "text",
        "missing",
        "columns found",
        "'hello'",
    )


def test_csv_duplicate_header(tmp_path):
    expect(tmp_path, "data.csv", "id,text,text,label\na,x,y,pos\n", 1, "text", "duplicate")


def test_csv_bom_header(tmp_path):
    df, _ = build(
        tmp_path,
        "data.csv",
        b"\xef\xbb\xbf" + (LAB_CSV + "b,bye,neg\n").encode(),
        kind="labelled",
        path="data.csv",
        id_field="id",
        min_per_class=0,
    )
    assert df["prompt_id"].tolist() == ["a", "b"]


def test_csv_latin1_byte(tmp_path):
    (tmp_path / "responses.jsonl").write_text(
        "".join(
            json.dumps({"pair_id": p, "variant": "q1", "question": "q"}) + "\n"
            for p in ("p1", "p2", "p3")
        )
    )
    content = "pair_id,is_faithful,model\np1,True,m\np2,False,m\np3,True,caf\u00e9\n".encode(
        "latin-1"
    )
    expect(
        tmp_path,
        "scores.csv",
        content,
        4,
        "model",
        "UTF-8",
        "0xe9",
        kind="phase2",
        scores="scores.csv",
        responses="responses.jsonl",
        min_per_class=0,
    )


def test_csv_utf16_with_bom(tmp_path):
    expect(tmp_path, "data.csv", (LAB_CSV + "b,bye,neg\n").encode("utf-16"), 1, None, "UTF-16")


def test_csv_utf16_without_bom(tmp_path):
    expect(tmp_path, "data.csv", (LAB_CSV + "b,bye,neg\n").encode("utf-16-le"), 1, None, "UTF-16")


@pytest.mark.parametrize("content", ["", "  \n\t\r\n"], ids=["empty", "whitespace_only"])
def test_csv_empty(tmp_path, content):
    expect(tmp_path, "data.csv", content, None, None, "empty")


def test_csv_huge_field(tmp_path):
    big = "w" * HUGE
    df, s = build(tmp_path, "data.csv", LAB_CSV + f"b,{big},neg\n")
    assert df["text"].tolist() == ["hello", big]
    write_prompt_table(df, s, tmp_path / "t.csv", tmp_path / "s.json")
    pd.testing.assert_frame_equal(read_prompt_table(tmp_path / "t.csv"), df)


def test_csv_nan_truth_value(tmp_path):
    expect(
        tmp_path,
        "facts.csv",
        "subject,relation,object,is_true\nA,r1,B,True\nA,r1,C,nan\n",
        3,
        "is_true",
        "'nan'",
        "not a boolean",
        **FACTS_SPEC,
    )


def test_csv_huge_bad_value_is_clipped_in_message(tmp_path):
    expect(
        tmp_path,
        "facts.csv",
        f"subject,relation,object,is_true\nA,r1,B,{'z' * HUGE}\n",
        2,
        "is_true",
        "not a boolean",
        **FACTS_SPEC,
    )


def test_csv_none_nan_na_are_plain_labels(tmp_path):
    df, _ = build(tmp_path, "data.csv", "text,label\na,None\nb,nan\nc,NA\nd,null\n")
    assert df["label"].tolist() == ["None", "nan", "NA", "null"]


def test_csv_empty_label(tmp_path):
    expect(tmp_path, "data.csv", "text,label\na,x\nb,\n", 3, "label", "empty")


def test_csv_unicode_ids_and_multiline_texts(tmp_path):
    ids = ["\U0001f600", "\u05e9\u05dc\u05d5\u05dd\u202e", "e\u0301", "nul\x00id"]
    texts = ['two\nlines, "quoted"', "cr\ronly", "\u2028sep\x85", "z\x00"]
    body = "".join(f"{csv_cell(i, ',')},{csv_cell(t, ',')},pos\n" for i, t in zip(ids, texts))
    df, _ = build(
        tmp_path,
        "data.csv",
        "id,text,label\n" + body,
        kind="labelled",
        path="data.csv",
        id_field="id",
        min_per_class=0,
    )
    assert df["prompt_id"].tolist() == ids and df["text"].tolist() == texts
    assert df["source_line"].tolist() == [2, 4, 6, 7]


def test_jsonl_truncated_object(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "bye\n',
        2,
        "text",
        "invalid JSON",
    )


def test_jsonl_array_line(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n["b", "x"]\n',
        2,
        None,
        "JSON object",
        "array",
    )


def test_jsonl_scalar_line(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\nnull\n',
        2,
        None,
        "JSON object",
        "null",
    )


def test_jsonl_nested_question(tmp_path):
    (tmp_path / "scores.csv").write_text("pair_id,is_faithful\np1,True\np2,False\n")
    content = "".join(
        json.dumps(r) + "\n"
        for r in [
            {"pair_id": "p1", "variant": "q1", "question": "q"},
            {"pair_id": "p1", "variant": "q2", "question": "q"},
            {"pair_id": "p2", "variant": "q1", "question": {"text": "q"}},
        ]
    )
    expect(
        tmp_path,
        "responses.jsonl",
        content,
        3,
        "question",
        "object",
        kind="phase2",
        scores="scores.csv",
        responses="responses.jsonl",
        min_per_class=0,
    )


def test_jsonl_trailing_garbage(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"} x\n',
        2,
        None,
        "column 29",
    )


def test_jsonl_latin1_byte(tmp_path):
    content = '{"text": "a", "label": "x"}\n{"text": "caf\u00e9", "label": "x"}\n'.encode("latin-1")
    expect(tmp_path, "data.jsonl", content, 2, "text", "UTF-8")


def test_jsonl_utf16(tmp_path):
    expect(
        tmp_path, "data.jsonl", '{"text": "a", "label": "x"}\n'.encode("utf-16"), 1, None, "UTF-16"
    )


@pytest.mark.parametrize("content", ["", "\n \n\t\n"], ids=["empty", "whitespace_only"])
def test_jsonl_empty(tmp_path, content):
    expect(tmp_path, "data.jsonl", content, None, None, "empty")


def test_jsonl_huge_line(tmp_path):
    big = "\u00e9" * HUGE
    df, _ = build(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n' + json.dumps({"text": big, "label": "x"}),
    )
    assert df["text"].tolist() == ["a", big]


def test_jsonl_huge_integer(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": ' + "9" * 5000 + ', "label": "x"}\n',
        2,
        "text",
        "number",
    )


def test_jsonl_deep_nesting(tmp_path):
    deep = "[" * 100000 + "]" * 100000
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "note": ' + deep + "}\n",
        2,
        "note",
        "nested",
    )


def test_jsonl_nan_label(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n{"text": "c", "label": NaN}\n',
        3,
        "label",
    )


def test_jsonl_lone_surrogate(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b\\ud800", "label": "x"}\n',
        2,
        "text",
        "surrogate",
    )


def test_jsonl_raw_nul_in_string(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b\x00", "label": "x"}\n',
        2,
        "text",
        "control character",
    )


def test_jsonl_duplicate_key(tmp_path):
    expect(
        tmp_path,
        "data.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "x", "label": "y"}\n',
        2,
        "label",
        "duplicate",
    )


def test_jsonl_unicode_ids_and_texts(tmp_path):
    recs = [
        {"id": i, "text": t, "label": "x"}
        for i, t in [
            ("\U0001f600", "a\u2028b"),
            ("\u202eabc", "nul\x00"),
            ("e\u0301", "two\nlines"),
            ("\ufeffx", "\u0645\r"),
        ]
    ]
    content = "".join(json.dumps(r, ensure_ascii=k % 2 == 0) + "\n" for k, r in enumerate(recs))
    df, _ = build(
        tmp_path,
        "data.jsonl",
        content,
        kind="labelled",
        path="data.jsonl",
        id_field="id",
        min_per_class=0,
    )
    assert df["prompt_id"].tolist() == [r["id"] for r in recs]
    assert df["text"].tolist() == [r["text"] for r in recs]
    assert df["source_line"].tolist() == [1, 2, 3, 4]


def test_phase2_scores_jsonl_nested_truth_value(tmp_path):
    (tmp_path / "responses.jsonl").write_text(
        "".join(
            json.dumps({"pair_id": p, "variant": "q1", "question": "q"}) + "\n"
            for p in ("p1", "p2")
        )
    )
    content = (
        '{"pair_id": "p1", "is_faithful": true}\n{"pair_id": "p2", "is_faithful": {"v": true}}\n'
    )
    expect(
        tmp_path,
        "scores.jsonl",
        content,
        2,
        "is_faithful",
        "not a boolean",
        kind="phase2",
        scores="scores.jsonl",
        responses="responses.jsonl",
        min_per_class=0,
    )


def test_failed_ingest_writes_nothing(tmp_path):
    """The workflow step builds then writes; a bad input leaves no (partial) output behind."""
    (tmp_path / "data.csv").write_text(LAB_CSV + 'b,"oops,neg\n')
    out = tmp_path / "out"
    with pytest.raises(InputError):
        df, s = build_prompt_table("ds", {"kind": "labelled", "path": "data.csv"}, tmp_path)
        write_prompt_table(df, s, out / "t.csv", out / "s.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]
