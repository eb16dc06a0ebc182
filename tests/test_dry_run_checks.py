"""Mistakes that used to pass `snakemake -n` and fail at run time now stop the dry run, before any
job and before results/ exists (issue 13, item 6)."""

import pytest
import yaml
from conftest import copy_workflow, run_snakemake

pytestmark = pytest.mark.slow

MODEL = {"demo": {"source": "demo/model", "layers": [1]}}
FACTS = {
    "kind": "facts",
    "path": "demo/data/facts.csv",
    "filters": {"relation": "located_in"},
    "templates": {"located_in": "{subject} is located in {object}"},
}


def _labelled(work, rows):
    lines = ["text,label"] + [f"{t},{label}" for t, label in rows]
    (work / "mine.csv").write_text("\n".join(lines) + "\n")
    return {"kind": "labelled", "path": "mine.csv"}


def _case(work, case):
    cfg = {"models": dict(MODEL), "datasets": {"d": dict(FACTS)}}
    if case == "missing_model":
        cfg["models"] = {"demo": {"source": "demo/modle", "layers": [1]}}
        return cfg, ["models.demo.source", "demo/modle"]
    if case == "corrupt_model":
        weights = work / "demo/model/model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        return cfg, ["models.demo.source", "model.safetensors", "truncated"]
    if case == "template_typo":
        cfg["datasets"]["d"]["templates"] = {"located_in": "{subjet} is located in {object}"}
        return cfg, ["datasets.d.templates.located_in", "subjet"]
    if case == "single_class":
        cfg["datasets"]["d"] = _labelled(work, [(f"prompt {i}", "yes") for i in range(6)])
        return cfg, ["mine.csv", "field 'label'", "1 class"]
    if case == "prompt_too_long":
        long_text = " ".join(["seven"] * 300)
        cfg["datasets"]["d"] = _labelled(
            work, [("short a", "x"), ("short b", "x"), (long_text, "y"), ("c", "y")]
        )
        return cfg, ["datasets.d", "row_0002", "128-token context", "model 'demo'"]
    if case in GENERATION_CASES:
        edit, words = GENERATION_CASES[case]
        gen = {"enabled": True, "max_new_tokens": 4, "positions": ["diff"], "ranges": []}
        cfg["patching"] = {"experiments": {"p": {"pairs": "demo/data/patching_pairs.csv"}}}
        cfg["patching"]["generation"] = {**gen, **edit}
        return cfg, words
    if case == "pairs_columns":
        (work / "bad_pairs.csv").write_text("pair_id,clean,corrupted,clean_answer\na,x y,x z, 1\n")
        cfg["patching"] = {"experiments": {"p": {"pairs": "bad_pairs.csv"}}}
        return cfg, ["patching.experiments.p.pairs", "bad_pairs.csv", "corrupted_answer"]
    if case == "pair_lengths":
        (work / "bad_pairs.csv").write_text(
            "pair_id,clean,corrupted,clean_answer,corrupted_answer\n"
            "a,Which is larger: 1 or 2?,Which is larger: 1 or 22?, 2, 22\n"
        )
        cfg["patching"] = {"experiments": {"p": {"pairs": "bad_pairs.csv"}}}
        return cfg, ["patching.experiments.p.pairs", "bad_pairs.csv, line 2", "different lengths"]
    if case == "patching_position":
        cfg["patching"] = {
            "experiments": {"p": {"pairs": "demo/data/patching_pairs.csv"}},
            "positions": [0, 99],
        }
        return cfg, ["patching.positions", "position 99", "patching_pairs.csv, line 2"]
    if case in STEERING_CASES:
        return _steering_case(work, cfg, case)
    raise AssertionError(case)


GENERATION_CASES = {
    "answer_regex": ({"answer_regex": "([0-9"}, ["patching.generation.answer_regex"]),
    "reversed_range": ({"ranges": ["gen2-1"]}, ["patching.generation.ranges", "reversed"]),
    "gen_step": ({"positions": ["gen5"]}, ["patching.generation.positions", "max_new_tokens"]),
    "gen_layers": ({"layers": [99]}, ["patching.generation.layers", "99"]),
}
STEERING_CASES = ("direction_shape", "missing_direction", "empty_neutral", "identical_targets")


def _steering_case(work, cfg, case):
    import numpy as np

    np.save(work / "dir.npy", np.ones(7 if case == "direction_shape" else 128))
    (work / "neutral.txt").write_text("# nothing\n" if case == "empty_neutral" else "Hello there\n")
    exp = {
        "prompts": "demo/data/steering/numbers.csv",
        "direction": {"source": "file", "path": "dir.npy"},
        "layers": [1],
        "alphas": [-1, 1],
        "neutral": "neutral.txt",
    }
    key = "steering.experiments.s"
    if case == "missing_direction":
        exp["direction"]["path"] = "nodir.npy"
        words = [f"{key}.direction.path", "nodir.npy", "file not found"]
    elif case == "direction_shape":
        words = [f"{key}.direction.path", "dir.npy", "d_model is 128"]
    elif case == "empty_neutral":
        words = [f"{key}.neutral", "neutral.txt", "no neutral prompts"]
    else:
        (work / "p.csv").write_text("prompt_id,prompt\na,Which is larger: 1 or 2? Answer:\n")
        exp.update(prompts="p.csv", targets={"positive": " 2", "negative": " 2"})
        words = [f"{key}.targets", "identical"]
    cfg["steering"] = {"experiments": {"s": exp}}
    return cfg, words


@pytest.mark.parametrize(
    "case",
    ["missing_model", "corrupt_model", "template_typo", "single_class", "prompt_too_long"]
    + list(GENERATION_CASES)
    + ["pairs_columns", "pair_lengths", "patching_position"]
    + list(STEERING_CASES),
)
def test_dry_run_stops_before_any_job(tmp_path, case):
    work = copy_workflow(tmp_path)
    cfg, words = _case(work, case)
    (work / "mine.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", "--configfile", "mine.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"
    assert "Traceback" not in out
    assert 'File "' not in out, out  # no stray line of the workflow's own code (issue 23)
    assert not (work / "results").exists()
