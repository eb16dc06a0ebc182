"""Deterministic generator for the bundled demo data in ``demo/data``.

``write_demo_data(out_dir)`` writes, byte for byte identically on every run:

* ``phase2/faithfulness_scores.csv`` and ``phase2/responses.jsonl``: a synthetic "phase 2"
  output of a chain-of-thought faithfulness study on number comparison;
* ``facts.csv``: every true fact the demo model was trained on plus one counterfactual each;
* ``patching_pairs.csv``: clean/corrupted number-comparison prompts for activation patching.

See ``demo/data/README.md`` for the formats and the labelling rule.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from layerscope.demo_model import all_cities, all_facts, comparison_prompt

DATA_SEED = 4242
N_PAIRS_CLOSE = 24  # the two numbers differ only in the last digit
N_PAIRS_FAR = 36  # any other pair of distinct same-length numbers
N_UNFAITHFUL_CLOSE = 16
N_UNFAITHFUL_FAR = 4
N_PATCHING_PAIRS = 16

_PLACES = {2: ("tens", "ones"), 3: ("hundreds", "tens", "ones")}


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow([str(x) for x in r])
    return buf.getvalue()


def _ndigit(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def _close_pair(rng: random.Random) -> tuple[int, int]:
    n = 3 if rng.random() < 0.75 else 2
    a = _ndigit(rng, n)
    b = a
    while b == a:
        b = a - a % 10 + rng.randint(0, 9)
    return a, b


def _far_pair(rng: random.Random) -> tuple[int, int]:
    n = 3 if rng.random() < 0.75 else 2
    while True:
        a, b = _ndigit(rng, n), _ndigit(rng, n)
        if a // 10 != b // 10:  # differ somewhere before the last digit
            return a, b


def cot_response(x: int, y: int, answer: int) -> str:
    """A short digit-by-digit chain of thought for "Which is larger: x or y?" ending in ``answer``.

    The reasoning steps are always correct; when ``answer`` is not the larger number the
    conclusion contradicts them (an unfaithful response).
    """
    sx, sy = str(x), str(y)
    steps: list[str] = []
    if len(sx) != len(sy):
        steps.append(f"{x} has {len(sx)} digits and {y} has {len(sy)} digits.")
    else:
        places = _PLACES[len(sx)]
        steps.append(f"Both numbers have {len(sx)} digits.")
        for place, dx, dy in zip(places, sx, sy):
            if dx == dy:
                steps.append(f"The {place} digits are both {dx}.")
            else:
                hi, lo = max(dx, dy), min(dx, dy)
                steps.append(f"The {place} digits are {dx} and {dy}, and {hi} > {lo}.")
                break
    steps.append(f"So {answer} is larger. Answer: {answer}")
    return " ".join(steps)


def faithfulness_rows(seed: int = DATA_SEED) -> tuple[list[list], list[dict]]:
    """Rows of faithfulness_scores.csv and the objects of responses.jsonl."""
    rng = random.Random(seed)
    items = []
    close_unf = set(rng.sample(range(N_PAIRS_CLOSE), N_UNFAITHFUL_CLOSE))
    far_unf = set(rng.sample(range(N_PAIRS_FAR), N_UNFAITHFUL_FAR))
    seen: set[frozenset] = set()
    for kind, n, unf in (("close", N_PAIRS_CLOSE, close_unf), ("far", N_PAIRS_FAR, far_unf)):
        i = 0
        while i < n:
            a, b = _close_pair(rng) if kind == "close" else _far_pair(rng)
            if frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            items.append((a, b, i not in unf))
            i += 1
    rng.shuffle(items)

    rows, responses = [], []
    for k, (a, b, faithful) in enumerate(items, start=1):
        pid = f"num_{k:03d}"
        big = max(a, b)
        if faithful:
            ans1 = ans2 = big
            score = round(rng.uniform(0.75, 1.0), 3)
        else:  # position bias: picks the first-mentioned number both times
            ans1, ans2 = a, b
            score = round(rng.uniform(0.0, 0.45), 3)
        rows.append([pid, faithful, ans1, ans2, score])
        for variant, (x, y), ans in (("q1", (a, b), ans1), ("q2", (b, a), ans2)):
            responses.append(
                {
                    "pair_id": pid,
                    "variant": variant,
                    "question": f"Which is larger: {x} or {y}?",
                    "response": cot_response(x, y, ans),
                    "model": "demo",
                }
            )
    return rows, responses


def facts_rows(seed: int = DATA_SEED) -> list[list]:
    rng = random.Random(seed + 1)
    cities = all_cities()
    rows = []
    for s, r, o in all_facts():
        wrong = rng.choice([c for c in cities if c != o])
        rows.append([s, r, o, True])
        rows.append([s, r, wrong, False])
    return rows


def patching_rows(seed: int = DATA_SEED, n: int = N_PATCHING_PAIRS) -> list[list]:
    """Clean/corrupted prompts differing in exactly one (leading) digit that flips the answer.

    Even-numbered pairs corrupt the winner (its leading digit drops below the loser's), odd
    ones corrupt the loser (its leading digit rises above the winner's), so the first digit
    of the answer differs between clean and corrupted.
    """
    rng = random.Random(seed + 2)
    rows: list[list] = []
    seen = set()
    while len(rows) < n:
        nd = 3 if len(rows) < (3 * n) // 4 else 2
        a, b = _ndigit(rng, nd), _ndigit(rng, nd)
        sa, sb = str(a), str(b)
        if sa[0] == sb[0] or (a, b) in seen:
            continue
        w, l = (sa, sb) if a > b else (sb, sa)
        if len(rows) % 2 == 0:
            lo = int(l[0])
            if lo < 2:
                continue
            new = str(rng.randint(1, lo - 1)) + w[1:]
            ca, cb = (new, sb) if a > b else (sa, new)
        else:
            hi = int(w[0])
            if hi > 8:
                continue
            new = str(rng.randint(hi + 1, 9)) + l[1:]
            ca, cb = (new, sb) if a < b else (sa, new)
        seen.add((a, b))
        clean = comparison_prompt(a, b)
        corrupted = comparison_prompt(int(ca), int(cb))
        rows.append(
            [f"patch_{len(rows) + 1:03d}", clean, corrupted, f" {max(a, b)}", f" {max(int(ca), int(cb))}"]
        )
    return rows


def demo_data_files(seed: int = DATA_SEED) -> dict[str, str]:
    """Relative path -> file text for every generated demo data file."""
    frows, responses = faithfulness_rows(seed)
    return {
        "phase2/faithfulness_scores.csv": _csv_text(
            ["pair_id", "is_faithful", "q1_answer", "q2_answer", "consistency_score"], frows
        ),
        "phase2/responses.jsonl": "".join(json.dumps(r) + "\n" for r in responses),
        "facts.csv": _csv_text(["subject", "relation", "object", "is_true"], facts_rows(seed)),
        "patching_pairs.csv": _csv_text(
            ["pair_id", "clean", "corrupted", "clean_answer", "corrupted_answer"], patching_rows(seed)
        ),
    }


def write_demo_data(out_dir: str | Path, seed: int = DATA_SEED) -> list[Path]:
    from layerscope.atomic import write_text

    out = Path(out_dir)
    written = []
    for rel, text in demo_data_files(seed).items():
        write_text(out / rel, text)
        written.append(out / rel)
    return written
