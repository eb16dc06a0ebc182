"""The chain-of-thought rules end to end on the demo model (workflow/rules/cot.smk): outputs, the
mistakes that stop the dry run, and which jobs a config edit reruns. Takes ~1-2 min (one real run
of caching, one probe, trajectories and early answering on 8 chains of thought)."""

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

pytestmark = pytest.mark.slow

PHASE2 = {
    "kind": "phase2",
    "scores": "demo/data/phase2/faithfulness_scores.csv",
    "responses": "demo/data/phase2/responses.jsonl",
}


def config(**cot):
    return {
        "models": {"demo": {"source": "demo/model", "layers": [1, 3]}},
        "datasets": {
            "q": {**PHASE2, "max_per_class": {"faithful": 10, "unfaithful": 10}},
            "c": {
                **PHASE2,
                "text": "question_response",
                "max_per_class": {"faithful": 4, "unfaithful": 4},
                "min_per_class": 2,
            },
        },
        "probes": {"n_splits": 3, "n_repeats": 1, "n_permutations": 20, "n_random_directions": 2},
        "patching": {"experiments": {}},
        "cot": {
            "datasets": ["c"],
            "lens": ["logit", "tuned"],
            "probes": [{"dataset": "q", "layer": 3}],
            "tuned_lens": {"steps": 20},
            "n_boot": 200,
            "early_answering": {"fractions": [0, 0.5, 1]},
            **cot,
        },
    }


TARGETS = [
    "results/figures/demo/c/cot_lens_heatmap.png",
    "results/figures/demo/c/cot_early_answering.png",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = copy_workflow(tmp_path_factory.mktemp("cot"))
    (work / "mine.yaml").write_text(yaml.safe_dump(config()))
    run_snakemake(work, *TARGETS, "--configfile", "mine.yaml")
    return work


def test_outputs(run):
    traj = run / "results/trajectories/demo/c"
    lens = pd.read_csv(traj / "lens.csv")
    assert set(lens["lens"]) == {"logit", "tuned"} and set(lens["layer"]) == set(range(6))
    pos = pd.read_csv(traj / "positions.csv")
    assert len(pos) == 8 and (pos["answer_start_token"] > pos["reasoning_start_token"]).all()
    probes = pd.read_csv(traj / "probe_trajectories.csv")
    assert set(probes["probe"]) == {"q_L3_resid_post_mean"}
    assert len(probes) == pos["n_tokens"].sum()
    kl = pd.read_csv(traj / "lens_kl.csv")
    assert set(kl["split"]) == {"train", "heldout"}
    summ = pd.read_csv(traj / "lead_time_summary.csv")
    assert "difference" in set(summ["label"])
    early = pd.read_csv(run / "results/cot/demo/c/early_answering_summary.csv")
    assert set(early["fraction"]) == {0.0, 0.5, 1.0}
    assert set(early["condition"]) == {"truncated", "filler"}
    # the chain-of-thought dataset is read along positions only: no pooled cache of it
    assert not (run / "results/activations/demo/c").exists()
    table = pd.read_csv(run / "results/datasets/c/prompts.csv")
    assert {"reasoning_start_char", "answer_start_char", "answer"} <= set(table.columns)


def test_config_edits_rerun_only_their_jobs(run):
    edits = {
        "early_answering": {"fractions": [0, 0.25, 1]},
        "n_boot": 300,
    }
    for key, value in edits.items():
        cfg = config(**{key: value})
        (run / "edit.yaml").write_text(yaml.safe_dump(cfg))
        proc = run_snakemake(run, *TARGETS, "-n", "--configfile", "edit.yaml")
        counts = job_counts(proc.stdout)
        want = "early_answering" if key == "early_answering" else "trajectories"
        assert counts.get(want) == 1, (key, counts)
        other = "trajectories" if want == "early_answering" else "early_answering"
        assert other not in counts and "cache_activations" not in counts, (key, counts)


@pytest.mark.parametrize("case", ["unknown_dataset", "no_marker", "bad_probe_layer"])
def test_dry_run_stops(tmp_path, case):
    work = copy_workflow(tmp_path)
    cfg = config()
    if case == "unknown_dataset":
        cfg["cot"]["datasets"] = ["nope"]
        words = ["cot.datasets", "nope"]
    elif case == "no_marker":
        cfg["datasets"]["c"]["answer_marker"] = "Final answer:"
        words = ["responses.jsonl", "line", "response", "Final answer:"]
    else:
        cfg["cot"]["probes"] = [{"dataset": "q", "layer": 2}]
        words = ["cot.probes", "layer 2"]
    (work / "mine.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", "--configfile", "mine.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    for word in words:
        assert word in out, f"{word!r} not in:\n{out}"
