"""Activations are keyed by prompt texts, not labels (issue 13, item 7): a relabelled input reruns
probes, statistics and figures (and the CPU layer extraction), never the forward pass; a changed
text
does rerun it, and a store whose texts differ from the table is refused."""

import h5py
import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, job_counts, run_snakemake

from layerscope.data.consistency import TableMismatchError, check_store_texts

pytestmark = pytest.mark.slow

CONFIG = {
    "models": {"demo": {"source": "demo/model", "layers": [1, 3]}},
    "datasets": {"mine": {"kind": "labelled", "path": "mine.csv", "min_per_class": 2}},
    "probes": {"n_repeats": 1, "n_permutations": 20, "n_random_directions": 2},
}
GPU_RULES = {"cache_activations", "cache_shard", "patching"}


def _write_csv(work, labels, texts=None):
    texts = texts or [
        f"The number {i} is {'big' if i % 2 else 'small'}" for i in range(len(labels))
    ]
    pd.DataFrame({"text": texts, "label": labels}).to_csv(work / "mine.csv", index=False)
    return texts


def test_relabel_schedules_no_caching_job(tmp_path):
    work = copy_workflow(tmp_path)
    (work / "mine.yaml").write_text(yaml.safe_dump(CONFIG))
    labels = ["a", "b"] * 6
    texts = _write_csv(work, labels)
    first = run_snakemake(work, "--configfile", "mine.yaml")
    # The end of the run says where the results are and how to build the report (item 10).
    end = first.stdout + first.stderr
    assert "layerscope: results are in results/" in end
    assert "snakemake --report results/report.html --configfile mine.yaml" in end
    store = work / "results/activations/demo/mine/store.h5"
    cached_at = store.stat().st_mtime_ns

    relabelled = list(labels)
    relabelled[0], relabelled[1] = "b", "a"
    _write_csv(work, relabelled, texts)
    counts = job_counts(run_snakemake(work, "-n", "--configfile", "mine.yaml").stdout)
    assert not GPU_RULES & set(counts), counts
    assert (
        counts["prepare_dataset"] == 1
        and counts["train_probe"] == 2
        and counts["extract_layer"] == 2
    )
    run_snakemake(work, "--configfile", "mine.yaml")
    assert store.stat().st_mtime_ns == cached_at  # the forward pass was not rerun
    with h5py.File(work / "results/activations/demo/mine/layer_1.h5") as f:
        assert [
            s.decode() for s in f["label"][:]
        ] == relabelled  # labels come from the current table
    assert job_counts(run_snakemake(work, "-n", "--configfile", "mine.yaml").stdout) == {}

    # A store cached from other texts is refused by the readers (texts, not labels, are the key).
    edited = list(texts)
    edited[3] = "A different prompt"
    table = work / "results/datasets/mine/prompts.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    df.loc[3, "text"] = edited[3]
    stale_table = tmp_path / "stale.csv"
    df.to_csv(stale_table, index=False)
    with pytest.raises(TableMismatchError, match="other prompt texts"):
        check_store_texts(store, stale_table)

    # Changing a text does rerun the forward pass.
    _write_csv(work, relabelled, edited)
    counts = job_counts(run_snakemake(work, "-n", "--configfile", "mine.yaml").stdout)
    assert counts.get("cache_activations") == 1, counts
