"""Early answering (Lanham et al. 2023, arXiv 2307.13702): does cutting the reasoning short change
the answer?

For each chain-of-thought prompt (question tokens ``ids[:r]``, reasoning ``ids[r:m]``, marker
``ids[m:a]``, answer from ``a``; see :mod:`layerscope.data.cot`) and each fraction ``f``:

``truncated``  ``ids[:r] + ids[r : r + k] + ids[m:a]`` with ``k = round(f * (m - r))``: the first
               ``k`` reasoning tokens, then the answer marker
``filler``     ``ids[:r] + filler * k + ids[m:a]``: the same length, the reasoning replaced by
               filler tokens (the filler text's ids, repeated and cut to ``k``)

and the model generates greedily (batched by length, KV cache:
:func:`layerscope.interventions.generation.greedy_generate`). The answer is read from the text
after the marker if the model writes one again, else from the whole generated text, with
``answer_regex``. At ``f = 1`` the truncated prompt is ``ids[:a]``, the model's full chain: its
answer there is ``final_answer``, and ``matches_final`` compares every other answer with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from layerscope.errors import LayerscopeError
from layerscope.interventions.generation import (
    DEFAULT_ANSWER_REGEX,
    decode_generated,
    extract_answer,
    greedy_generate,
)

CONDITIONS = ("truncated", "filler")
ROW_COLUMNS = (
    "prompt_id",
    "label",
    "fraction",
    "condition",
    "n_reasoning_tokens",
    "n_kept",
    "generated_text",
    "answer",
    "final_answer",
    "matches_final",
)
SUMMARY_COLUMNS = (
    "fraction",
    "condition",
    "label",
    "n",
    "n_match",
    "rate",
    "ci_low",
    "ci_high",
    "half_width",
    "n_for_half_width",
    "n_for_power",
    "n_empty",
    "warning",
)


@dataclass(frozen=True)
class CotPrompt:
    """Token layout of one chain-of-thought prompt."""

    prompt_id: str
    label: str
    ids: tuple[int, ...]
    reasoning_start: int  # r
    marker_start: int  # m
    answer_start: int  # a


def variant_ids(p: CotPrompt, fraction: float, condition: str, filler: Sequence[int]) -> list[int]:
    """The prompt ids of one (fraction, condition) variant (see the module docstring)."""
    r, m, a = p.reasoning_start, p.marker_start, p.answer_start
    k = int(round(fraction * (m - r)))
    if condition == "truncated":
        kept = list(p.ids[r : r + k])
    elif condition == "filler":
        if not filler:
            raise LayerscopeError("early answering: the filler text has no tokens")
        kept = [int(filler[i % len(filler)]) for i in range(k)]
    else:
        raise LayerscopeError(f"unknown condition {condition!r}; expected {list(CONDITIONS)}")
    return list(p.ids[:r]) + kept + list(p.ids[m:a])


def read_answer(text: str, marker: re.Pattern, answer_regex: str) -> str:
    """The answer in generated ``text``: after the last marker match if there is one."""
    found = list(marker.finditer(text))
    return extract_answer(text[found[-1].end() :] if found else text, answer_regex)


def generate_all(
    stepper, prompts_ids: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int
) -> list[list[int]]:
    """Greedy continuations of every prompt, batched by equal length (no padding needed)."""
    import torch

    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts_ids):
        by_len.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts_ids]
    with stepper.session():
        for _, idx in sorted(by_len.items()):
            for s in range(0, len(idx), batch_size):
                part = idx[s : s + batch_size]
                x = torch.tensor([list(prompts_ids[i]) for i in part], device=stepper.device)
                with torch.no_grad():
                    gen, _ = greedy_generate(stepper, x, max_new_tokens)
                for row, i in enumerate(part):
                    out[i] = gen[row].tolist()
    return out


def early_answering(
    stepper,
    tokenizer,
    prompts: Sequence[CotPrompt],
    *,
    fractions: Sequence[float],
    filler_ids: Sequence[int],
    marker: re.Pattern,
    max_new_tokens: int,
    batch_size: int = 32,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    log: Callable[[str], object] = print,
) -> pd.DataFrame:
    """early_answering.csv: one row per (prompt, fraction, condition)."""
    fractions = sorted(set(float(f) for f in fractions) | {1.0})
    plan = [
        (p, f, c, variant_ids(p, f, c, filler_ids))
        for p in prompts
        for f in fractions
        for c in CONDITIONS
    ]
    gens = generate_all(stepper, [v[3] for v in plan], max_new_tokens, batch_size)
    rows = []
    for (p, f, c, ids), gen in zip(plan, gens):
        text = decode_generated(tokenizer, gen)
        rows.append(
            {
                "prompt_id": p.prompt_id,
                "label": p.label,
                "fraction": f,
                "condition": c,
                "n_reasoning_tokens": p.marker_start - p.reasoning_start,
                "n_kept": len(ids) - p.reasoning_start - (p.answer_start - p.marker_start),
                "generated_text": text,
                "answer": read_answer(text, marker, answer_regex),
            }
        )
    df = pd.DataFrame(rows)
    full = df[(df["fraction"] == 1.0) & (df["condition"] == "truncated")]
    final = dict(zip(full["prompt_id"], full["answer"]))
    df["final_answer"] = df["prompt_id"].map(final)
    df["matches_final"] = (df["answer"] == df["final_answer"]) & (df["final_answer"] != "")
    log(f"early answering: {len(df)} generations, {len(prompts)} prompts")
    return df[list(ROW_COLUMNS)]


def summarize_early(rows: pd.DataFrame, precision) -> pd.DataFrame:
    """early_answering_summary.csv: per (fraction, condition, label) the share of answers equal to
    the full-chain answer, Wilson interval and the precision columns (``n_for_power`` against the
    filler rate at the same fraction and label). A cell where every answer is empty carries a
    ``warning`` (the model did not answer: the rate says nothing)."""
    from layerscope.analysis.power import rate_precision

    g = (
        rows.assign(empty=rows["answer"] == "")
        .groupby(["fraction", "condition", "label"], sort=True)
        .agg(
            n=("matches_final", "size"), n_match=("matches_final", "sum"), n_empty=("empty", "sum")
        )
        .reset_index()
    )
    filler = {
        (r.fraction, r.label): r.n_match / r.n
        for r in g[g["condition"] == "filler"].itertuples(index=False)
    }
    out = []
    for r in g.itertuples(index=False):
        n, k = int(r.n), int(r.n_match)
        prec = rate_precision(
            k,
            n,
            half_width=precision.half_width,
            effect=precision.rate_effect,
            p0=float(filler.get((r.fraction, r.label), 0.0)),
            conf=precision.confidence,
            power=precision.power,
        )
        out.append(
            {
                "fraction": r.fraction,
                "condition": r.condition,
                "label": r.label,
                "n": n,
                "n_match": k,
                "rate": k / n if n else np.nan,
                **{c: prec[c] for c in ("ci_low", "ci_high", "half_width")},
                "n_for_half_width": prec["n_for_half_width"],
                "n_for_power": prec["n_for_power"],
                "n_empty": int(r.n_empty),
                "warning": "no_answer: every generated answer is empty" if r.n_empty == n else "",
            }
        )
    df = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for c in ("n_for_half_width", "n_for_power"):
        df[c] = df[c].astype("Int64")
    return df
