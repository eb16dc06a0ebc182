"""Deterministic generator for the bundled demo data in ``demo/data``.

``write_demo_data(out_dir)`` writes, byte for byte identically on every run:

* ``phase2/faithfulness_scores.csv`` and ``phase2/responses.jsonl``: a "phase 2" output of a
  chain-of-thought faithfulness study on number comparison: the bundled demo model's own
  greedy chains of thought, labelled by the regime planted in training (faithful = the
  ``computed`` cue, unfaithful = the ``posthoc`` cue; generating them loads ``demo/model``
  and runs it on CPU);
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
import re
from pathlib import Path

from devkit.demo_cot import parse_answer
from devkit.demo_model import (
    REGIMES,
    RELATIONS,
    all_cities,
    all_facts,
    comparison_prompt,
    cot_question,
    greedy_continuations,
)

DATA_SEED = 4242
MODEL_DIR = Path(__file__).resolve().parents[1] / "demo" / "model"

# Phase 2: candidate pairs are drawn (seeded) from a mix of kinds, each with a regime
# (computed with probability P_COMPUTED), the demo model writes its chain of thought for both
# orders of each, and the first N_FAITHFUL computed / N_UNFAITHFUL post-hoc candidates whose
# two chains both end in "Answer: N" are kept (in candidate order).
N_FAITHFUL = 60
N_UNFAITHFUL = 40
N_CANDIDATES = 300  # generated in one go; enough well-formed pairs for both quotas
P_COMPUTED = 0.6
N_NEW_TOKENS = 80  # the longest chain is about 60 tokens
ANSWER_END = re.compile(r"Answer: -?\d+")
PAIR_KINDS: tuple[tuple[str, float], ...] = (  # (kind, weight)
    ("last_digit", 0.30),  # same length, differ only in the last digit: 847 vs 843
    ("one_digit", 0.25),  # same length, differ in exactly one earlier digit: 847 vs 547
    ("near", 0.20),  # same length, within +-9, differ before the last digit: 602 vs 597
    ("far", 0.25),  # any other same-length pair differing before the last digit
)
N_PATCHING_PAIRS = 16


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


def load_demo_model(model_dir: str | Path = MODEL_DIR):
    """(model, tokenizer) of the bundled demo model, float32, eval mode, on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model, tok


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


def model_chains(model, tokenizer, questions: list[str]) -> list[str]:
    """The demo model's greedy chain of thought after each question (deterministic).

    One thread and deterministic algorithms; the text is cut after the first ``Answer: N``
    (greedy decoding stops at EOS, which follows it in training).
    """
    import torch

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        gens = greedy_continuations(model, tokenizer, questions, max_new_tokens=N_NEW_TOKENS)
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)
    out = []
    for g in gens:
        m = ANSWER_END.search(g)
        out.append(g[: m.end()].strip() if m else g.strip())
    return out


def _p_larger(model, tokenizer, questions, chains, pairs) -> list[float]:
    """P(larger) / (P(larger) + P(smaller)) at the answer, after the model's own reasoning."""
    prompts = [f"{q} {c[: c.rindex('Answer:')]}Answer:" for q, c in zip(questions, chains)]
    return _answer_probs(
        model, tokenizer, prompts, [max(p) for p in pairs], [min(p) for p in pairs]
    )


def _candidates(rng: random.Random) -> list[tuple[str, int, int, str]]:
    """(kind, a, b, regime) for N_CANDIDATES distinct pairs (no pair twice, in either order)."""
    cands: list[tuple[str, int, int, str]] = []
    seen: set[frozenset] = set()
    while len(cands) < N_CANDIDATES:
        kind, a, b = _candidate_pair(rng)
        regime = REGIMES[0] if rng.random() < P_COMPUTED else REGIMES[1]
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            cands.append((kind, a, b, regime))
    return cands


def _well_formed(chain: str, cand: tuple[str, int, int, str]) -> bool:
    """The chain ends in ``Answer: N`` with N one of the question's two numbers.

    On the hard pair kinds the model sometimes misreads a digit and concludes a number that is
    in neither question ("So 558 is larger" for 556 vs 548); such a chain answers another
    question, and no truncation of it can tell the two regimes apart."""
    return parse_answer(chain) in (str(cand[1]), str(cand[2]))


def faithfulness_rows(
    seed: int = DATA_SEED, model=None, tokenizer=None
) -> tuple[list[list], list[dict]]:
    """Rows of faithfulness_scores.csv and the objects of responses.jsonl.

    Responses are the demo model's own chains of thought (see :func:`model_chains`); the
    label is the planted regime of the question's cue (faithful = computed). The model is
    loaded from ``demo/model`` unless given.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_demo_model()
    cands = _candidates(random.Random(seed))
    q1 = [cot_question(a, b, r) for _, a, b, r in cands]
    q2 = [cot_question(b, a, r) for _, a, b, r in cands]
    c1, c2 = model_chains(model, tokenizer, q1), model_chains(model, tokenizer, q2)

    quota = {REGIMES[0]: N_FAITHFUL, REGIMES[1]: N_UNFAITHFUL}
    keep = []
    for k, ((*_, regime), x, y) in enumerate(zip(cands, c1, c2)):
        if quota[regime] > 0 and _well_formed(x, cands[k]) and _well_formed(y, cands[k]):
            quota[regime] -= 1
            keep.append(k)
    if any(quota.values()):
        raise RuntimeError(
            f"only {len(keep)} pairs after {N_CANDIDATES} candidates; missing {quota}"
        )
    pairs = [(cands[k][1], cands[k][2]) for k in keep]
    p1 = _p_larger(model, tokenizer, [q1[k] for k in keep], [c1[k] for k in keep], pairs)
    p2 = _p_larger(model, tokenizer, [q2[k] for k in keep], [c2[k] for k in keep], pairs)

    rows, responses = [], []
    for n, (k, u, v) in enumerate(zip(keep, p1, p2), start=1):
        kind, a, b, regime = cands[k]
        pid = f"num_{n:03d}"
        rows.append(
            [
                pid,
                regime == REGIMES[0],
                parse_answer(c1[k]),
                parse_answer(c2[k]),
                f"{min(u, v):.3f}",
                f"{u:.3f}",
                f"{v:.3f}",
                kind,
            ]
        )
        for variant, question, chain in (("q1", q1[k], c1[k]), ("q2", q2[k], c2[k])):
            responses.append(
                {
                    "pair_id": pid,
                    "variant": variant,
                    "question": question,
                    "response": chain,
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
