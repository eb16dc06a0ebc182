"""Label normalisation of labelled datasets (issue 13, item 2): one spelling per class, refused
mixes,
and a single-class dataset failing at ingest with the file named."""

import json

import pytest

from layerscope.data.datasets import build_prompt_table, normalise_labels
from layerscope.errors import InputError


def _csv(path, labels):
    rows = ["text,label"] + [f"prompt {i},{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return path


def _jsonl(path, labels):
    path.write_text(
        "".join(
            json.dumps({"text": f"prompt {i}", "label": v}) + "\n" for i, v in enumerate(labels)
        )
    )
    return path


def _build(path, **spec):
    spec = {"kind": "labelled", "path": path.name, "min_per_class": 1, **spec}
    return build_prompt_table("d", spec, path.parent, min_classes=2)


def test_csv_boolean_spellings_are_two_classes(tmp_path):
    df, summary = _build(
        _csv(tmp_path / "d.csv", ["1", "1.0", "True", "0", "0.0", "False", " true ", "FALSE"])
    )
    assert summary["classes"] == ["false", "true"]
    assert df["label"].tolist() == [
        "true",
        "true",
        "true",
        "false",
        "false",
        "false",
        "true",
        "false",
    ]


def test_jsonl_booleans_strings_and_numbers_are_two_classes(tmp_path):
    df, summary = _build(
        _jsonl(tmp_path / "d.jsonl", [True, "true", 1, False, "false", 0, "True", 0.0])
    )
    assert summary["counts"] == {"false": 4, "true": 4}


def test_whitespace_is_stripped(tmp_path):
    df, summary = _build(
        _csv(tmp_path / "d.csv", ["positive", "positive ", " positive", "negative", "negative\t"])
    )
    assert summary["counts"] == {"negative": 2, "positive": 3}


def test_numeric_labels_compare_as_numbers(tmp_path):
    df, summary = _build(_jsonl(tmp_path / "d.jsonl", [1, "1.0", 1.0, 2, "2", " 2.00 ", 3.5]))
    assert df["label"].tolist() == ["1", "1", "1", "2", "2", "2", "3.5"]


def test_text_and_numbers_stay_distinct_classes(tmp_path):
    _, summary = _build(_csv(tmp_path / "d.csv", ["pos", "neg", "0", "0.0"]))
    assert summary["counts"] == {"0": 2, "neg": 1, "pos": 1}


@pytest.mark.parametrize(
    "labels, words",
    [
        (
            ["True", "False", "maybe", "maybe"],
            ["booleans", "text", "line 2: 'True'", "line 4: 'maybe'"],
        ),
        (["true", "false", "2", "1"], ["booleans", "numbers other than 0/1", "line 4: '2'"]),
    ],
)
def test_irreconcilable_mix_names_file_lines_and_values(tmp_path, labels, words):
    path = _csv(tmp_path / "d.csv", labels)
    with pytest.raises(InputError) as err:
        _build(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "field 'label'" in msg
    for word in words:
        assert word in msg, msg


def test_normalise_labels_direct():
    assert normalise_labels([(2, " a "), (3, "a"), (4, "1e1"), (5, 10)], "f.csv", "label") == [
        "a",
        "a",
        "10",
        "10",
    ]


def test_single_class_fails_at_ingest_naming_file_and_field(tmp_path):
    path = _csv(tmp_path / "d.csv", ["positive", "positive ", "positive"])
    with pytest.raises(InputError) as err:
        _build(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "field 'label'" in msg and "1 class" in msg
    # Filters that leave one class are caught the same way.
    path = _csv(tmp_path / "e.csv", ["a", "b", "a", "b"])
    with pytest.raises(InputError, match="e.csv"):
        _build(path, filters={"label": "a"})


def test_single_class_facts_names_the_truth_column(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text("subject,relation,object,is_true\nParis,in,France,1\nRome,in,Italy,true\n")
    with pytest.raises(InputError) as err:
        build_prompt_table(
            "f",
            {
                "kind": "facts",
                "path": "facts.csv",
                "templates": {"in": "{subject} in {object}"},
                "min_per_class": 0,
            },
            tmp_path,
            min_classes=2,
        )
    assert str(err.value).startswith(str(path)) and "field 'is_true'" in str(err.value)
