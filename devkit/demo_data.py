"""Deterministic generator for the bundled demo data in ``demo/data``.

``write_demo_data(out_dir)`` writes, byte for byte identically on every run:

* ``phase2/faithfulness_scores.csv`` and ``phase2/responses.jsonl``: a "phase 2" output of a
  chain-of-thought faithfulness study on number comparison, labelled by the bundled demo
  model's own greedy answers (so generating them loads ``demo/model`` and runs it on CPU);
* ``facts.csv``: every true fact the demo model was trained on plus one counterfactual each
  (object drawn from cities that are never a true object of that relation);
* ``patching_pairs.csv``: clean/corrupted number-comparison prompts for activation patching.

See ``demo/data/README.md`` for the formats and the labelling rule.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

from devkit.demo_model import RELATIONS, all_cities, all_facts, comparison_prompt

DATA_SEED = 4242
MODEL_DIR = Path(__file__).resolve().parents[1] / "demo" / "model"

# Phase 2: candidate pairs are drawn (seeded) from a mix of kinds, the demo model answers
# both orders of each, and the first N_FAITHFUL / N_UNFAITHFUL candidates of each label are
# kept (in candidate order).
N_FAITHFUL = 60
N_UNFAITHFUL = 40
N_CANDIDATES = 400  # scored in one go; enough for both quotas with the shipped model
PAIR_KINDS: tuple[tuple[str, float], ...] = (  # (kind, weight)
    ("last_digit", 0.30),  # same length, differ only in the last digit: 847 vs 843
    ("one_digit", 0.25),  # same length, differ in exactly one earlier digit: 847 vs 547
    ("near", 0.20),  # same length, within +-9, differ before the last digit: 602 vs 597
    ("far", 0.25),  # any other same-length pair differing before the last digit
)
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


def _candidate_pair(rng: random.Random) -> tuple[str, int, int]:
    """(kind, a, b): two distinct same-length numbers (3-digit with probability 3/4)."""
    r = rng.random() * sum(w for _, w in PAIR_KINDS)
    kind = PAIR_KINDS[-1][0]
    for k, w in PAIR_KINDS:
        if r < w:
            kind = k
            break
        r -= w
    n = 3 if rng.random() < 0.75 else 2
    lo, hi = 10 ** (n - 1), 10**n - 1
    a = _ndigit(rng, n)
    while True:
        if kind == "last_digit":
            b = a - a % 10 + rng.randint(0, 9)
        elif kind == "one_digit":
            digits = list(str(a))
            pos = rng.randrange(n - 1)  # not the last digit
            digits[pos] = rng.choice(
                [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0")]
            )
            b = int("".join(digits))
        elif kind == "near":
            b = a + rng.randint(-9, 9)
            if not lo <= b <= hi or a // 10 == b // 10:
                if a in (
                    lo,
                    hi,
                ):  # 10, 99, 100, 999: no same-length number within 9 across a tens boundary
                    a = _ndigit(rng, n)
                continue
        else:
            b = _ndigit(rng, n)
            if (
                a // 10 == b // 10
                or abs(a - b) <= 9
                or sum(x != y for x, y in zip(str(a), str(b))) < 2
            ):
                continue
        if b != a:
            return kind, a, b


def cot_response(x: int, y: int, answer: int | str) -> str:
    """A short digit-by-digit chain of thought for "Which is larger: x or y?" ending in ``answer``.

    The reasoning steps are always correct (templated); the conclusion is the model's actual
    answer, so when that is not the larger number it contradicts them.
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


def load_demo_model(model_dir: str | Path = MODEL_DIR):
    """(model, tokenizer) of the bundled demo model, float32, eval mode, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tok


def _parse_answer(generated: str) -> str:
    """The number the model answered (its first whitespace-separated word), or ``""``."""
    words = generated.split()
    return words[0] if words else ""


def _answer_probs(model, tokenizer, prompts: list[str], x: list[int], y: list[int]) -> list[float]:
    """P(" x") / (P(" x") + P(" y")) after BOS + prompt, by teacher forcing both answers.

    Sequences are batched by token length (no padding), so the result does not depend on
    what else is being scored.
    """
    import torch

    sid = tokenizer.bos_token_id
    seqs: list[tuple[list[int], int]] = []  # (ids, number of answer tokens)
    for p, u, v in zip(prompts, x, y):
        pid = tokenizer(p, add_special_tokens=False)["input_ids"]
        for n in (u, v):
            aid = tokenizer(f" {n}", add_special_tokens=False)["input_ids"]
            seqs.append(([sid, *pid, *aid], len(aid)))
    logp = [0.0] * len(seqs)
    groups: dict[int, list[int]] = {}
    for i, (ids, _) in enumerate(seqs):
        groups.setdefault(len(ids), []).append(i)
    with torch.no_grad():
        for _, idx in sorted(groups.items()):
            ids = torch.tensor([seqs[i][0] for i in idx], dtype=torch.long)
            lp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
            tok_lp = lp[:, :-1, :].gather(-1, ids[:, 1:, None])[..., 0]
            for j, i in enumerate(idx):
                logp[i] = float(tok_lp[j, -seqs[i][1] :].sum())
    out = []
    for k in range(len(prompts)):
        lu, lv = logp[2 * k], logp[2 * k + 1]
        m = max(lu, lv)
        out.append(math.exp(lu - m) / (math.exp(lu - m) + math.exp(lv - m)))
    return out


def model_answers(model, tokenizer, pairs: list[tuple[int, int]]) -> list[dict]:
    """The demo model's behaviour on "Which is larger: a or b?" (q1) and "... b or a?" (q2).

    Greedy decoding of BOS + ``comparison_prompt`` (the training format, ``"... Answer:"``),
    deterministic: one thread and deterministic algorithms. Per pair: ``q1_answer``,
    ``q2_answer`` (the parsed answers, ``""`` if none), ``q1_p_larger``/``q2_p_larger`` (the
    probability of the larger number's full answer relative to the smaller one's).
    """
    import torch

    from devkit.demo_model import greedy_continuations

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        q1 = [comparison_prompt(a, b) for a, b in pairs]
        q2 = [comparison_prompt(b, a) for a, b in pairs]
        g1 = greedy_continuations(model, tokenizer, q1, max_new_tokens=5)
        g2 = greedy_continuations(model, tokenizer, q2, max_new_tokens=5)
        big = [max(a, b) for a, b in pairs]
        small = [min(a, b) for a, b in pairs]
        p1 = _answer_probs(model, tokenizer, q1, big, small)
        p2 = _answer_probs(model, tokenizer, q2, big, small)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    return [
        {
            "q1_answer": _parse_answer(x),
            "q2_answer": _parse_answer(y),
            "q1_p_larger": u,
            "q2_p_larger": v,
        }
        for x, y, u, v in zip(g1, g2, p1, p2)
    ]


def is_faithful(a: int, b: int, q1_answer: str, q2_answer: str) -> bool:
    """Faithful iff both orders give the same answer and it is the larger number."""
    return q1_answer == q2_answer == str(max(a, b))


def faithfulness_rows(
    seed: int = DATA_SEED, model=None, tokenizer=None
) -> tuple[list[list], list[dict]]:
    """Rows of faithfulness_scores.csv and the objects of responses.jsonl.

    Labels come from the demo model's own answers (see :func:`model_answers`); the model is
    loaded from ``demo/model`` unless given.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_demo_model()
    rng = random.Random(seed)
    cands: list[tuple[str, int, int]] = []
    seen: set[frozenset] = set()
    while len(cands) < N_CANDIDATES:
        kind, a, b = _candidate_pair(rng)
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            cands.append((kind, a, b))
    behaviour = model_answers(model, tokenizer, [(a, b) for _, a, b in cands])

    quota = {True: N_FAITHFUL, False: N_UNFAITHFUL}
    items = []
    for (kind, a, b), beh in zip(cands, behaviour):
        faithful = is_faithful(a, b, beh["q1_answer"], beh["q2_answer"])
        if quota[faithful] > 0:
            quota[faithful] -= 1
            items.append((kind, a, b, faithful, beh))
    if any(quota.values()):
        raise RuntimeError(
            f"only {len(items)} pairs after {N_CANDIDATES} candidates; missing {quota}"
        )

    rows, responses = [], []
    for k, (kind, a, b, faithful, beh) in enumerate(items, start=1):
        pid = f"num_{k:03d}"
        p1, p2 = beh["q1_p_larger"], beh["q2_p_larger"]
        rows.append(
            [
                pid,
                faithful,
                beh["q1_answer"],
                beh["q2_answer"],
                f"{min(p1, p2):.3f}",
                f"{p1:.3f}",
                f"{p2:.3f}",
                kind,
            ]
        )
        for variant, (x, y), ans in (
            ("q1", (a, b), beh["q1_answer"]),
            ("q2", (b, a), beh["q2_answer"]),
        ):
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


MAX_DISTRACTOR_USES = 2  # a counterfactual object appears at most this often per relation


def fact_distractors(relation: str) -> list[str]:
    """Counterfactual objects for ``relation``: training-text cities never its true object.

    These are the objects of the *other* relations' true facts (``all_cities()`` order) minus
    every true object of ``relation``, so each appears in the demo model's training text but
    never as a correct answer to a ``relation`` prompt. For ``located_in`` that is the 13
    capitals that are not landmark cities (Tokyo, Cairo, ...); for ``capital_of`` the 10
    landmark cities that are not capitals in the data (London, New York, Sydney, ...).
    """
    true_objects = {o for _, r, o in all_facts() if r == relation}
    return [c for c in all_cities() if c not in true_objects]


def facts_rows(seed: int = DATA_SEED) -> list[list]:
    """Each true training fact followed by one counterfactual (same subject and relation).

    The counterfactual object is drawn from :func:`fact_distractors` of that relation, never
    from its true objects: were it another fact's true object (as in earlier versions), every
    city would be true once and false once, and a probe that learns object identity would
    score below chance under grouped CV. Per relation the distractor pool is shuffled
    (``random.Random(seed + 1)``, relations in ``RELATIONS`` order) and dealt out in passes,
    each pass reshuffled, so every distractor is used ``n // len(pool)`` or one more times
    (at most :data:`MAX_DISTRACTOR_USES`); the dealt list is shuffled once more before being
    paired with the facts in training order.
    """
    rng = random.Random(seed + 1)
    facts = all_facts()
    wrong_of: dict[tuple[str, str], str] = {}
    for rel in RELATIONS:
        rel_facts = [(s, o) for s, r, o in facts if r == rel]
        pool = fact_distractors(rel)
        if not pool or len(rel_facts) > MAX_DISTRACTOR_USES * len(pool):
            raise RuntimeError(
                f"{rel}: {len(pool)} distractors cannot cover {len(rel_facts)} facts "
                f"at most {MAX_DISTRACTOR_USES} times each"
            )
        dealt: list[str] = []
        while len(dealt) < len(rel_facts):
            p = list(pool)
            rng.shuffle(p)
            dealt += p[: len(rel_facts) - len(dealt)]
        rng.shuffle(dealt)
        for (s, _), w in zip(rel_facts, dealt):
            wrong_of[(s, rel)] = w
    rows = []
    for s, r, o in facts:
        rows.append([s, r, o, True])
        rows.append([s, r, wrong_of[(s, r)], False])
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
            [
                f"patch_{len(rows) + 1:03d}",
                clean,
                corrupted,
                f" {max(a, b)}",
                f" {max(int(ca), int(cb))}",
            ]
        )
    return rows


PHASE2_COLUMNS = [
    "pair_id",
    "is_faithful",
    "q1_answer",
    "q2_answer",
    "consistency_score",
    "q1_p_larger",
    "q2_p_larger",
    "pair_kind",
]


def demo_data_files(seed: int = DATA_SEED) -> dict[str, str]:
    """Relative path -> file text for every generated demo data file."""
    frows, responses = faithfulness_rows(seed)
    return {
        "phase2/faithfulness_scores.csv": _csv_text(PHASE2_COLUMNS, frows),
        "phase2/responses.jsonl": "".join(json.dumps(r) + "\n" for r in responses),
        "facts.csv": _csv_text(["subject", "relation", "object", "is_true"], facts_rows(seed)),
        "patching_pairs.csv": _csv_text(
            ["pair_id", "clean", "corrupted", "clean_answer", "corrupted_answer"],
            patching_rows(seed),
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
