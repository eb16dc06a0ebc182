#!/usr/bin/env python
"""(Re)write the steering demo inputs in demo/data/steering deterministically from the demo data.

    python demo/make_steering_data.py [--out demo/data/steering]

* ``facts_located_in.csv``: every true ``located_in`` fact of demo/data/facts.csv as the prompt
  ``"{subject} is located in"``, positive answer the true object, negative answer the counterfactual
  object of the same subject (both with a leading space).
* ``numbers.csv``: the q1 question of the first 12 faithful and first 12 unfaithful pairs of
  demo/data/phase2 as ``"{question} Answer:"``, positive answer the larger number (the correct
  answer), negative answer the smaller one. The question carries its regime cue, so this is
  an answer with no reasoning: post-hoc (unfaithful) questions mostly answer the larger
  number, while computed (faithful) ones fall back to the first number (right about half the
  time).
* ``neutral.txt``: texts of the demo model's training formats that the two experiments do not ask
  about (capital facts, arithmetic tasks): the KL damage guard.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
NEUTRAL = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "The capital of Egypt is Cairo.",
    "The capital of Canada is Ottawa.",
    "Answer minimally: Given the numbers 25 and 9 calculate the sum: 34",
    "Answer minimally: Given the numbers 42 and 11 calculate the maximum: 42",
    "Answer minimally: Given the numbers 7 and 3 calculate the minimum: 3",
    "Answer minimally: Given the numbers 99 and 1 calculate the difference: 98",
]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def facts_rows(facts_csv: Path) -> list[list[str]]:
    with open(facts_csv, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["relation"] == "located_in"]
    true = {r["subject"]: r["object"] for r in rows if r["is_true"] == "True"}
    false = {r["subject"]: r["object"] for r in rows if r["is_true"] == "False"}
    return [
        [f"loc_{i + 1:02d}", f"{s} is located in", f" {true[s]}", f" {false[s]}"]
        for i, s in enumerate(true)
    ]


def number_rows(phase2: Path, per_class: int = 12) -> list[list[str]]:
    with open(phase2 / "faithfulness_scores.csv", newline="", encoding="utf-8") as f:
        scores = list(csv.DictReader(f))
    questions = {}
    for line in (phase2 / "responses.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r["variant"] == "q1":
            questions[r["pair_id"]] = r["question"]
    picked = [s for s in scores if s["is_faithful"] == "True"][:per_class]
    picked += [s for s in scores if s["is_faithful"] == "False"][:per_class]
    picked.sort(key=lambda s: s["pair_id"])
    out = []
    for s in picked:
        q = questions[s["pair_id"]]
        a, b = (int(x) for x in re.findall(r"\d+", q)[:2])
        out.append([s["pair_id"], f"{q} Answer:", f" {max(a, b)}", f" {min(a, b)}"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=str(DATA / "steering"))
    out = Path(ap.parse_args(argv).out)
    out.mkdir(parents=True, exist_ok=True)
    header = ["prompt_id", "prompt", "positive", "negative"]
    _write_csv(out / "facts_located_in.csv", header, facts_rows(DATA / "facts.csv"))
    _write_csv(out / "numbers.csv", header, number_rows(DATA / "phase2"))
    (out / "neutral.txt").write_text("\n".join(NEUTRAL) + "\n", encoding="utf-8")
    for name in ("facts_located_in.csv", "numbers.csv", "neutral.txt"):
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
