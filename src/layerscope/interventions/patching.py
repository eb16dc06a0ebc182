"""Activation patching: which (component, layer, position) carries the clean answer?

For each pair of prompts (``clean``, ``corrupted``) that differ in a few tokens and whose
answers differ, :func:`patch_sweep` runs

1. the clean prompt once, caching the activations of every hook that will be patched (one
   clean cache per pair, reused for every patched run), and the corrupted prompt once;
2. for every (component, layer, position) the *corrupted* prompt with the clean activation of
   that single cell written over the corrupted one, and measures the logit difference

       LD = logit[clean_answer_token] - logit[corrupted_answer_token]   (at the last position)

   and the normalized recovery ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)``:
   1 = the patch restores the clean behaviour completely, 0 = no effect. Recovery is NaN for a
   pair whose clean and corrupted LD are closer than ``min_ld_gap``.

Answer tokens
-------------
Answers are tokenized *in context*: ``tokens(prompt + answer)`` minus ``tokens(prompt)`` (the
BOS policy applied to both), for the clean and the corrupted side separately. The metric uses
the FIRST answer token where the two sides differ; the answer tokens before it (a shared
prefix) are appended to both prompts. With the demo tokenizer ``" 847"`` is
``["Ġ", "8", "4", "7"]``, so for ``" 847"`` vs ``" 347"`` the prompts get ``"Ġ"`` appended and
the metric compares ``"8"`` with ``"3"``. If the prompt's tokens are not a prefix of the
prompt+answer tokens (a merge across the boundary), the answer is tokenized on its own
instead (recorded per pair in ``answer_tokenization``). Answers that share every token up to
the shorter one's end are an :class:`InputError` naming the pair. Clean and corrupted inputs
(prompt + shared prefix) must have the same number of tokens, else an :class:`InputError`
naming the pair and both lengths.

Components and hooks
--------------------
``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (and ``resid_mid``) use the legacy
TransformerLens hook names (see :data:`layerscope.engine.loading.HOOKS`). Per-head patching uses
``blocks.L.attn.hook_z`` (the per-head attention output *before* the output projection,
shape ``[batch, pos, n_heads, d_head]``; query heads for grouped-query models): the clean z of
one head at one position replaces the corrupted one. Heads are patched at the last position
by default (``head_positions="last"``) or at every configured position
(``head_positions="positions"``). They appear with ``component == "z"`` and ``head >= 0``; all
other rows have ``head == -1``. If the bridge has no ``hook_z`` the heads are skipped and
``result.notes`` says so.

Batching
--------
Patched runs are stacked along the batch dimension: one forward pass holds many
(component, layer, position[, head]) variants of one pair, or of several pairs with the same
token length (pairs are grouped by length, so no padding is ever needed). Each batch row is
patched at its own cell by hooks that index the batch rows. Every forward pass gets an explicit
all-ones attention mask (GPT-2's pad id is its BOS id; nothing is inferred from token ids).

Positions across pairs
----------------------
``position`` is the token index from the start (BOS included when prepended). Pairs of
different token lengths do not share a position axis, so :func:`summarize` and the figures
treat each token length (``n_tokens``) as its own group.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from layerscope.atomic import atomic_path
from layerscope.engine.loading import HOOKS, describe_model, hook_name, model_device
from layerscope.engine.tokens import resolve_bos, tokenize_prompts
from layerscope.errors import InputError, LayerscopeError

__all__ = [
    "COMPONENTS",
    "PAIR_COLUMNS",
    "PatchingResult",
    "PreparedPair",
    "load_pairs",
    "patch_cells",
    "patch_sweep",
    "prepare_pairs",
    "summarize",
    "write_patching",
]

PAIR_COLUMNS = ("pair_id", "clean", "corrupted", "clean_answer", "corrupted_answer")
COMPONENTS = tuple(HOOKS)  # resid_pre, attn_out, resid_mid, mlp_out, resid_post
HEAD_COMPONENT = "z"
HEAD_HOOK = "blocks.{L}.attn.hook_z"
METRICS = ("logit_diff", "recovery")
RESULT_COLUMNS = (
    "pair_id",
    "n_tokens",
    "layer",
    "position",
    "token",
    "component",
    "head",
    "metric",
    "value",
    "clean_logit_diff",
    "corrupted_logit_diff",
)


# --------------------------------------------------------------------------------------------
# reading pairs


def _check_pair_columns(columns: Sequence[str], shown: str) -> None:
    """Every column of :data:`PAIR_COLUMNS` must be in the file's header."""
    for col in PAIR_COLUMNS:
        if col not in columns:
            raise InputError(
                f"required column is missing; columns found: {', '.join(map(repr, columns))}",
                file=shown,
                field=col,
            )


def _pair_record(rec, columns: Sequence[str], shown: str) -> dict[str, Any]:
    """One record as strings (missing optional keys ""); required values must be non-empty."""
    from layerscope.data.datasets import scalar_str

    row: dict[str, Any] = {}
    for col in columns:
        if col not in rec.values:
            if col in PAIR_COLUMNS:
                raise InputError(
                    "key is missing from this record", file=shown, line=rec.line, field=col
                )
            row[col] = ""
            continue
        try:
            value = scalar_str(rec.values[col])
        except TypeError as exc:
            raise InputError(str(exc), file=shown, line=rec.line, field=col) from None
        if col in PAIR_COLUMNS and (value is None or value.strip() == ""):
            raise InputError(
                f"value {rec.values[col]!r} is empty", file=shown, line=rec.line, field=col
            )
        row[col] = "" if value is None else value
    return row


def _check_pair(row: Mapping[str, Any], line: int, seen: dict[str, int], shown: str) -> None:
    """A pair_id may appear once; its two prompts and its two answers must differ."""
    pid = row["pair_id"]
    if pid in seen:
        raise InputError(
            f"duplicate pair_id {pid!r} (first on line {seen[pid]}, again on line {line})",
            file=shown,
            line=line,
            field="pair_id",
        )
    seen[pid] = line
    if row["clean"] == row["corrupted"]:
        raise InputError(
            f"pair {pid!r}: the corrupted prompt is identical to the clean one",
            file=shown,
            line=line,
            field="corrupted",
        )
    if row["clean_answer"] == row["corrupted_answer"]:
        raise InputError(
            f"pair {pid!r}: the corrupted answer is identical to the clean one",
            file=shown,
            line=line,
            field="corrupted_answer",
        )


def load_pairs(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pairs table (``.csv``, ``.tsv`` or ``.jsonl``) with the columns of
    :data:`PAIR_COLUMNS`.

    Every value is kept as a string exactly as written (``" 586"`` keeps its space; no NA
    coercion). Extra columns are kept. Adds ``source_line`` (the 1-based line of the record) and
    sets ``df.attrs["source"]`` to the path, so later errors can point at the line. Raises
    :class:`InputError` naming file, line and field for a missing column or key, an empty value,
    a repeated ``pair_id``, or a pair whose two prompts or two answers are identical.
    """
    from layerscope.data.datasets import read_records

    columns, records, shown = read_records(path)
    _check_pair_columns(columns, shown)
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for rec in records:
        row = _pair_record(rec, columns, shown)
        _check_pair(row, rec.line, seen, shown)
        row["source_line"] = rec.line
        rows.append(row)
    ordered = list(PAIR_COLUMNS) + [c for c in columns if c not in PAIR_COLUMNS] + ["source_line"]
    df = pd.DataFrame(rows, columns=ordered)
    for col in ordered:
        if col != "source_line":
            df[col] = df[col].astype(str)
    df["source_line"] = df["source_line"].astype("int64")
    df.attrs["source"] = shown
    return df


# --------------------------------------------------------------------------------------------
# tokenization of pairs


@dataclass
class TokenPair:
    """A clean/corrupted pair as token ids of equal length (the base of every tokenized pair)."""

    pair_id: str
    clean_ids: list[int]
    corrupted_ids: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.clean_ids)

    @property
    def diff_positions(self) -> list[int]:
        return [i for i, (a, b) in enumerate(zip(self.clean_ids, self.corrupted_ids)) if a != b]


@dataclass
class PreparedPair(TokenPair):
    """One pair, tokenized: the model inputs (clean_ids: prompt (+ BOS) + shared answer prefix) and
    the two answer tokens of the metric."""

    clean_answer_id: int  # the first answer token where clean and corrupted differ
    corrupted_answer_id: int
    answer_prefix_ids: list[int]  # shared answer tokens appended to both prompts
    answer_tokenization: str  # "in_context" or "separate"
    clean_tokens: list[str] = field(default_factory=list)  # display strings per position
    corrupted_tokens: list[str] = field(default_factory=list)


def token_label(tokenizer, token_id: int) -> str:
    """A short display string for one token: decoded text, spaces shown as '␣', newlines as '⏎'."""
    text = tokenizer.decode([int(token_id)])
    if text == "":
        text = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")


def _display_tokens(tokenizer, ids: Sequence[int], prepend_bos: bool) -> list[str]:
    """Display strings of ``ids`` (the prepended BOS shown as ``BOS``)."""
    labels = [token_label(tokenizer, t) for t in ids]
    if prepend_bos and labels:
        labels[0] = "BOS"
    return labels


def _where(pairs: pd.DataFrame, i: int) -> dict[str, Any]:
    """Where row ``i`` of ``pairs`` came from: file and line (or row) for error messages."""
    line = None
    if "source_line" in pairs.columns:
        with contextlib.suppress(TypeError, ValueError):
            line = int(pairs["source_line"].iloc[i])
    where: dict[str, Any] = {"file": pairs.attrs.get("source"), "line": line}
    if line is None:
        where["row"] = i + 1
    return where


def answer_ids(
    tokenizer, prompt_ids: list[int], prompt: str, answer: str, prepend_bos: bool
) -> tuple[list[int], str]:
    """Answer tokens in context (prompt+answer minus prompt), else alone; and which."""
    full = tokenize_prompts(tokenizer, [prompt + answer], prepend_bos=prepend_bos)[0]
    if len(full) > len(prompt_ids) and full[: len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids) :], "in_context"
    alone = tokenize_prompts(tokenizer, [answer], prepend_bos=False)[0]
    return alone, "separate"


def prepare_pairs(tokenizer, pairs: pd.DataFrame, *, prepend_bos: bool) -> list[PreparedPair]:
    """Tokenize every pair (see the module docstring, "Answer tokens"); check equal lengths."""
    missing = [c for c in PAIR_COLUMNS if c not in pairs.columns]
    if missing:
        raise InputError(f"pairs table lacks column(s) {missing}", file=pairs.attrs.get("source"))
    out: list[PreparedPair] = []
    for i in range(len(pairs)):
        rec = pairs.iloc[i]
        pid = str(rec["pair_id"])
        clean_p, corr_p = str(rec["clean"]), str(rec["corrupted"])
        clean_a, corr_a = str(rec["clean_answer"]), str(rec["corrupted_answer"])
        cp, kp = tokenize_prompts(tokenizer, [clean_p, corr_p], prepend_bos=prepend_bos)
        ca, how_c = answer_ids(tokenizer, cp, clean_p, clean_a, prepend_bos)
        ka, how_k = answer_ids(tokenizer, kp, corr_p, corr_a, prepend_bos)
        k = next((j for j, (a, b) in enumerate(zip(ca, ka)) if a != b), None)
        if k is None:
            raise InputError(
                f"pair {pid!r}: clean answer {clean_a!r} and corrupted answer {corr_a!r} "
                f"share every token "
                f"({len(ca)} and {len(ka)} tokens); no answer token tells them apart",
                field="corrupted_answer",
                **_where(pairs, i),
            )
        prefix = ca[:k]
        clean_ids, corr_ids = cp + prefix, kp + prefix
        if len(clean_ids) != len(corr_ids):
            raise InputError(
                f"pair {pid!r}: clean and corrupted inputs tokenize to different lengths "
                f"(clean {len(clean_ids)} tokens, corrupted {len(corr_ids)} tokens); "
                f"patching needs "
                f"position-aligned prompts",
                field="corrupted",
                **_where(pairs, i),
            )
        out.append(
            PreparedPair(
                pair_id=pid,
                clean_ids=clean_ids,
                corrupted_ids=corr_ids,
                clean_answer_id=int(ca[k]),
                corrupted_answer_id=int(ka[k]),
                answer_prefix_ids=prefix,
                answer_tokenization="in_context" if how_c == how_k == "in_context" else "separate",
                clean_tokens=_display_tokens(tokenizer, clean_ids, prepend_bos),
                corrupted_tokens=_display_tokens(tokenizer, corr_ids, prepend_bos),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# the patching engine


@dataclass(frozen=True)
class _Cell:
    """One patched run: pair ``slot`` of the current chunk, ``hook``, positions, optional head."""

    slot: int
    hook: str
    positions: tuple[int, ...]
    head: int | None = None


def _component_hook(component: str, layer: int) -> str:
    """The hook name of a component (or ``z``, per head) at ``layer``."""
    if component == HEAD_COMPONENT:
        return HEAD_HOOK.format(L=layer)
    return hook_name(component, layer)


def _forward_logits_last(bridge, input_ids, fwd_hooks=()):
    """Logits at the last position, float64, shape [B, V]; explicit all-ones attention mask."""
    import torch

    mask = torch.ones_like(input_ids)
    with bridge.hooks(fwd_hooks=list(fwd_hooks)):
        logits = bridge(input_ids, attention_mask=mask, return_type="logits")
    return logits[:, -1, :].double()


def _cache_runs(bridge, ids_rows: Sequence[Sequence[int]], hooks: Sequence[str]):
    """One forward pass over equal-length rows.

    Returns (last-position logits, {hook: [B, T, ...]}).
    """
    import torch

    device = model_device(bridge)
    input_ids = torch.tensor([list(r) for r in ids_rows], dtype=torch.long, device=device)
    cache: dict[str, Any] = {}

    def make(name):
        def hook(tensor, hook=None):
            cache[name] = tensor.detach().clone()
            return None

        return hook

    logits = _forward_logits_last(bridge, input_ids, [(h, make(h)) for h in hooks])
    missing = [h for h in hooks if h not in cache]
    if missing:
        raise LayerscopeError(f"hooks did not fire: {', '.join(missing[:10])}")
    return logits, cache


def _patched_runs(
    bridge,
    cells: Sequence[_Cell],
    corrupted_rows: Sequence[Sequence[int]],
    source: Mapping[str, Any],
):
    """One forward pass; batch row r is ``corrupted_rows[cells[r].slot]`` patched at ``cells[r]``.

    ``source[hook]`` holds the patch values of every slot, shape ``[n_slots, T, ...]``.
    Returns last-position logits ``[len(cells), V]``.
    """
    import torch

    device = model_device(bridge)
    input_ids = torch.tensor(
        [list(corrupted_rows[c.slot]) for c in cells], dtype=torch.long, device=device
    )
    per_hook: dict[str, dict[str, list[int]]] = {}
    for r, c in enumerate(cells):
        d = per_hook.setdefault(
            c.hook, {"r": [], "s": [], "p": [], "hr": [], "hs": [], "hp": [], "hh": []}
        )
        for p in c.positions:
            if c.head is None:
                d["r"].append(r)
                d["s"].append(c.slot)
                d["p"].append(p)
            else:
                d["hr"].append(r)
                d["hs"].append(c.slot)
                d["hp"].append(p)
                d["hh"].append(c.head)

    def make(name, d):
        ix = {k: torch.tensor(v, dtype=torch.long, device=device) for k, v in d.items()}
        src = source[name]

        def hook(tensor, hook=None):
            out = tensor.clone()
            if len(ix["r"]):
                out[ix["r"], ix["p"]] = src[ix["s"], ix["p"]].to(out.dtype)
            if len(ix["hr"]):
                out[ix["hr"], ix["hp"], ix["hh"]] = src[ix["hs"], ix["hp"], ix["hh"]].to(out.dtype)
            return out

        return hook

    return _forward_logits_last(bridge, input_ids, [(h, make(h, d)) for h, d in per_hook.items()])


def _equal_cells(clean, corrupted):
    """Bitwise equality of clean and corrupted activations per (slot, position[, head])."""
    eq = clean == corrupted
    dims = tuple(range(3 if clean.dim() == 4 else 2, clean.dim()))
    return eq.all(dim=dims).cpu().numpy()


def _is_same(same, cell: _Cell) -> bool:
    """Whether the clean activation equals the corrupted one at every position of a cell."""
    if cell.head is None:
        sel = same[cell.slot, list(cell.positions)]
    else:
        sel = same[cell.slot, list(cell.positions), cell.head]
    return bool(np.all(sel))


def _logit_diff(logits, clean_tok, corr_tok):
    """Per row: logit of the clean answer minus logit of the corrupted answer."""
    import torch

    rows = torch.arange(logits.shape[0], device=logits.device)
    ct = torch.as_tensor(clean_tok, device=logits.device)
    kt = torch.as_tensor(corr_tok, device=logits.device)
    return (logits[rows, ct] - logits[rows, kt]).cpu().numpy()


def _recovery(patched, clean, corrupted, min_gap):
    """Normalized recovery of a patched LD; NaN when the pair's LD gap is too small."""
    gap = clean - corrupted
    if not np.isfinite(gap) or abs(gap) < min_gap:
        return float("nan")
    return float((patched - corrupted) / gap)


def resolve_positions(positions, n_tokens: int, pair_id: str) -> list[int]:
    """Token indices of ``positions`` (``all``, ``last``, k or a list) in a pair."""
    if isinstance(positions, str):
        if positions == "all":
            return list(range(n_tokens))
        if positions == "last":
            return [n_tokens - 1]
        raise LayerscopeError(
            f"positions {positions!r} not understood; expected 'all', 'last', "
            f"an int k (last k) or a list"
        )
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        k = int(positions)
        if k < 1:
            raise LayerscopeError(f"positions={k}: the number of last positions must be >= 1")
        return list(range(max(0, n_tokens - k), n_tokens))
    out: list[int] = []
    for p in positions:
        q = int(p) + n_tokens if int(p) < 0 else int(p)
        if not 0 <= q < n_tokens:
            raise LayerscopeError(
                f"position {p} does not exist in pair {pair_id!r} ({n_tokens} tokens)"
            )
        if q not in out:
            out.append(q)
    if not out:
        raise LayerscopeError("positions is an empty list")
    return sorted(out)


def _check_components(bridge, components: Sequence[str]) -> list[str]:
    """The components as a list; unknown, repeated or missing hooks are errors."""
    components = list(components)
    bad = [c for c in components if c not in HOOKS]
    if bad:
        raise LayerscopeError(
            f"unknown component(s) {bad}; expected some of {list(HOOKS)} (heads: heads=True)"
        )
    if len(set(components)) != len(components):
        raise LayerscopeError(f"duplicate components in {components}")
    for c in components:
        if hook_name(c, 0) not in bridge.hook_dict:
            raise LayerscopeError(
                f"component {c!r} is not available for this model (no hook {hook_name(c, 0)!r})"
            )
    return components


def _check_layers(layers, n_layers: int) -> list[int]:
    """Sorted layer indices (negative from the end); all of them if ``None``."""
    if layers is None:
        return list(range(n_layers))
    out = sorted({int(L) + n_layers if int(L) < 0 else int(L) for L in layers})
    bad = [L for L in out if not 0 <= L < n_layers]
    if bad or not out:
        raise LayerscopeError(
            f"layers {list(layers)} invalid; the model has layers 0..{n_layers - 1}"
        )
    return out


def heads_available(bridge) -> bool:
    """Whether the bridge exposes per-head attention outputs (``blocks.0.attn.hook_z``)."""
    return HEAD_HOOK.format(L=0) in bridge.hook_dict


def pairs_input(pairs) -> pd.DataFrame:
    """Pairs as a DataFrame: given, read from a path, or built from dicts."""
    if isinstance(pairs, pd.DataFrame):
        return pairs
    if isinstance(pairs, (str, os.PathLike)):
        return load_pairs(pairs)
    return pd.DataFrame(list(pairs))


def patch_cells(
    bridge,
    pair: PreparedPair,
    cells: Sequence[Mapping[str, Any]],
    *,
    source: str = "clean",
    batch_size: int = 64,
    min_ld_gap: float = 1e-6,
) -> pd.DataFrame:
    """Patch arbitrary cells of one prepared pair; each cell may cover several positions JOINTLY.

    ``cells``: dicts with ``component`` (a key of :data:`HOOKS` or ``"z"``), ``layer``,
    ``positions`` (a list of token indices patched together in one run, or ``"all"``) and, for
    ``"z"``, optional ``head`` (omitted/None: every head). ``source``: ``"clean"`` patches clean
    activations into the corrupted run (the sweep's direction); ``"corrupted"`` patches the
    corrupted run's own activations (a no-op control: recovery 0). Returns one row per cell with
    ``logit_diff``, ``recovery``, ``clean_logit_diff``, ``corrupted_logit_diff``.
    """
    import torch

    if source not in ("clean", "corrupted"):
        raise LayerscopeError(f"source {source!r}: expected 'clean' or 'corrupted'")
    T = pair.n_tokens
    specs: list[_Cell] = []
    for c in cells:
        comp, layer = str(c["component"]), int(c["layer"])
        pos = c.get("positions", "all")
        pos_list = (
            list(range(T))
            if pos == "all"
            else resolve_positions(
                list(pos) if not isinstance(pos, int) else [pos], T, pair.pair_id
            )
        )
        hook = _component_hook(comp, layer)
        if hook not in bridge.hook_dict:
            raise LayerscopeError(f"no hook {hook!r} on this model")
        head = c.get("head")
        if head is not None and comp != HEAD_COMPONENT:
            raise LayerscopeError(
                f"head given for component {comp!r}; heads exist only for component 'z'"
            )
        specs.append(_Cell(0, hook, tuple(pos_list), None if head is None else int(head)))
    hooks = sorted({s.hook for s in specs})
    with torch.inference_mode():
        logits, cache = _cache_runs(bridge, [pair.clean_ids, pair.corrupted_ids], hooks)
        ld = _logit_diff(logits, [pair.clean_answer_id] * 2, [pair.corrupted_answer_id] * 2)
        row = 0 if source == "clean" else 1
        src = {h: v[row : row + 1] for h, v in cache.items()}
        values: list[float] = []
        for b in range(0, len(specs), max(1, int(batch_size))):
            chunk = specs[b : b + batch_size]
            lg = _patched_runs(bridge, chunk, [pair.corrupted_ids], src)
            values.extend(
                _logit_diff(
                    lg, [pair.clean_answer_id] * len(chunk), [pair.corrupted_answer_id] * len(chunk)
                )
            )
    clean_ld, corr_ld = float(ld[0]), float(ld[1])
    out = pd.DataFrame([dict(c) for c in cells])
    out["logit_diff"] = [float(v) for v in values]
    out["recovery"] = [_recovery(float(v), clean_ld, corr_ld, min_ld_gap) for v in values]
    out["clean_logit_diff"] = clean_ld
    out["corrupted_logit_diff"] = corr_ld
    return out


@dataclass
class PatchingResult:
    """What :func:`patch_sweep` returns.

    ``df``: tidy rows (:data:`RESULT_COLUMNS`), two per patched cell (metric ``logit_diff`` and
    ``recovery``). ``pairs``: one row per pair (pair_id, n_tokens, clean/corrupted LD, answer
    tokens, differing positions, tokens). ``tokens``/``corrupted_tokens``: pair_id -> display
    strings per position. ``info``: model description, settings, timings.
    """

    df: pd.DataFrame
    pairs: pd.DataFrame
    tokens: dict[str, list[str]]
    corrupted_tokens: dict[str, list[str]]
    components: list[str]
    layers: list[int]
    n_heads: int
    heads: bool
    info: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def position_labels(self, n_tokens: int | None = None) -> dict[int, list[str]] | list[str]:
        """Axis labels per position for each token-length group (or one group).

        A position shows its token when every pair of the group has the same clean token there;
        otherwise ``"#"`` if they are all digits (the varying digits of different numbers), else
        up to three of them, most frequent first, joined by ``/``. Positions where some
        pair's clean and corrupted tokens differ get a trailing ``*``.
        """
        groups: dict[int, list[str]] = {}
        for n in sorted(self.pairs["n_tokens"].unique()):
            ids = self.pairs.loc[self.pairs["n_tokens"] == n, "pair_id"].tolist()
            labels = []
            for p in range(int(n)):
                labels.append(
                    merge_token_labels(
                        [self.tokens[i][p] for i in ids],
                        any(self.tokens[i][p] != self.corrupted_tokens[i][p] for i in ids),
                    )
                )
            groups[int(n)] = labels
        return groups if n_tokens is None else groups[int(n_tokens)]


def merge_token_labels(tokens: Sequence[str], differs: bool) -> str:
    """One axis label for the tokens of several pairs at a position."""
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    order = sorted(counts, key=lambda t: (-counts[t], list(counts).index(t)))
    if len(order) == 1:
        lab = order[0]
    elif all(t.lstrip("␣").isdigit() for t in order):
        lab = "#"  # a digit that varies across pairs
    else:
        lab = "/".join(order[:3]) + ("…" if len(order) > 3 else "")
    return lab + ("*" if differs else "")


@dataclass(frozen=True)
class _SweepPlan:
    """What :func:`patch_sweep` patches: pairs, cells per pair, hooks and the length chunks."""

    components: list[str]
    layers: list[int]
    n_heads: int
    heads: bool
    prepend: bool
    prepared: list[PreparedPair]
    pos_of: dict[str, list[int]]
    head_pos_of: dict[str, list[int]]
    hooks: list[str]
    chunks: list[list[int]]
    n_groups: int
    only: frozenset | None = None  # (n_tokens, component, layer, position, head) cells to run


@dataclass
class _SweepCounts:
    """Running totals of one sweep (forward passes, patched runs, cells skipped as identical)."""

    n_forward: int = 0
    n_patched: int = 0
    n_skipped: int = 0


def _check_sweep(bridge, pairs, components, layers, heads, batch_size, head_positions, notes, log):
    """Validate the settings; returns (pairs table, components, layers, heads patched)."""
    if batch_size < 1:
        raise LayerscopeError(f"batch_size must be >= 1, got {batch_size}")
    if head_positions not in ("last", "positions"):
        raise LayerscopeError(f"head_positions {head_positions!r}: expected 'last' or 'positions'")
    pairs_df = pairs_input(pairs)
    if len(pairs_df) == 0:
        raise LayerscopeError("no pairs to patch")
    components = _check_components(bridge, components)
    layers = _check_layers(layers, int(bridge.cfg.n_layers))
    do_heads = bool(heads)
    if do_heads and not heads_available(bridge):
        do_heads = False
        notes.append("per-head patching skipped: the bridge exposes no blocks.L.attn.hook_z")
        log(notes[-1])
    if not components and not do_heads:
        raise LayerscopeError("nothing to patch: no components and no heads")
    return pairs_df, components, layers, do_heads


def _length_chunks(prepared: Sequence[PreparedPair], batch_size: int) -> tuple[list, int]:
    """Pair indices grouped by token length, chunked so a chunk's clean+corrupted baseline fits
    one batch; returns (chunks, number of length groups)."""
    by_len: dict[int, list[int]] = {}
    for i, pp in enumerate(prepared):
        by_len.setdefault(pp.n_tokens, []).append(i)
    pairs_per_chunk = max(1, batch_size // 2)
    chunks = [
        idx[j : j + pairs_per_chunk]
        for _, idx in sorted(by_len.items())
        for j in range(0, len(idx), pairs_per_chunk)
    ]
    return chunks, len(by_len)


def _plan_sweep(
    bridge,
    pairs_df,
    components,
    layers,
    do_heads,
    positions,
    head_positions,
    batch_size,
    bos,
    only=None,
) -> _SweepPlan:
    """Tokenize the pairs, resolve every pair's positions and list the hooks to cache."""
    tokenizer = bridge.tokenizer
    prepend = resolve_bos(tokenizer, bos)
    prepared = prepare_pairs(tokenizer, pairs_df, prepend_bos=prepend)
    n_ctx = int(getattr(bridge.cfg, "n_ctx", 0) or 0)
    for pp in prepared:
        if n_ctx and pp.n_tokens > n_ctx:
            raise LayerscopeError(
                f"pair {pp.pair_id!r} has {pp.n_tokens} tokens, more than the model context {n_ctx}"
            )
    pos_of = {pp.pair_id: resolve_positions(positions, pp.n_tokens, pp.pair_id) for pp in prepared}
    head_pos_of = {
        pp.pair_id: ([pp.n_tokens - 1] if head_positions == "last" else pos_of[pp.pair_id])
        for pp in prepared
    }
    hooks = [_component_hook(c, L) for L in layers for c in components]
    if do_heads:
        hooks += [_component_hook(HEAD_COMPONENT, L) for L in layers]
    chunks, n_groups = _length_chunks(prepared, batch_size)
    return _SweepPlan(
        components=components,
        layers=layers,
        n_heads=int(getattr(bridge.cfg, "n_heads", 0) or 0),
        heads=do_heads,
        prepend=prepend,
        prepared=prepared,
        pos_of=pos_of,
        head_pos_of=head_pos_of,
        hooks=hooks,
        chunks=chunks,
        n_groups=n_groups,
        only=None if only is None else frozenset(only),
    )


def _baselines(bridge, cps: Sequence[PreparedPair], hooks: Sequence[str], skip_identical: bool):
    """Run the clean and corrupted prompts of a chunk once: (LD per row, clean cache, same).

    Rows ``0..k-1`` are clean, ``k..2k-1`` corrupted; ``same[hook]`` is ``[k, T]`` (or
    ``[k, T, H]``): True where the clean activation equals the corrupted one.
    """
    k = len(cps)
    logits, cache = _cache_runs(
        bridge, [p.clean_ids for p in cps] + [p.corrupted_ids for p in cps], hooks
    )
    base = _logit_diff(
        logits,
        [p.clean_answer_id for p in cps] * 2,
        [p.corrupted_answer_id for p in cps] * 2,
    )
    clean_src = {h: v[:k] for h, v in cache.items()}
    same = {h: _equal_cells(v[:k], v[k:]) for h, v in cache.items()} if skip_identical else {}
    return base, clean_src, same


def _chunk_cells(cps: Sequence[PreparedPair], plan: _SweepPlan) -> tuple[list[_Cell], list]:
    """Every cell of a chunk's pairs, and its (component, layer, position, head) label."""
    cells: list[_Cell] = []
    meta: list[tuple[str, int, int, int]] = []  # component, layer, position, head
    for slot, pp in enumerate(cps):
        for comp in plan.components:
            for L in plan.layers:
                for p in plan.pos_of[pp.pair_id]:
                    if _selected(plan, pp, (comp, L, p, -1)):
                        cells.append(_Cell(slot, _component_hook(comp, L), (p,)))
                        meta.append((comp, L, p, -1))
        if plan.heads:
            for L in plan.layers:
                for h in range(plan.n_heads):
                    for p in plan.head_pos_of[pp.pair_id]:
                        if _selected(plan, pp, (HEAD_COMPONENT, L, p, h)):
                            cells.append(_Cell(slot, _component_hook(HEAD_COMPONENT, L), (p,), h))
                            meta.append((HEAD_COMPONENT, L, p, h))
    return cells, meta


def _selected(plan: _SweepPlan, pp: PreparedPair, cell: tuple) -> bool:
    """Whether ``cell`` (component, layer, position, head) of ``pp`` is run (``only``)."""
    return plan.only is None or (pp.n_tokens, *cell) in plan.only


def _run_cells(bridge, cps, cells, base, clean_src, same, *, skip_identical, batch_size, counts):
    """The patched LD of every cell; identical cells take the corrupted LD without a run."""
    k = len(cps)
    corr_rows = [p.corrupted_ids for p in cps]
    values = np.empty(len(cells))
    run_idx = []
    for i, c in enumerate(cells):
        if skip_identical and _is_same(same[c.hook], c):
            values[i] = base[k + c.slot]  # the patch writes what is already there
        else:
            run_idx.append(i)
    for b in range(0, len(run_idx), batch_size):
        part_idx = run_idx[b : b + batch_size]
        part = [cells[i] for i in part_idx]
        lg = _patched_runs(bridge, part, corr_rows, clean_src)
        values[part_idx] = _logit_diff(
            lg,
            [cps[c.slot].clean_answer_id for c in part],
            [cps[c.slot].corrupted_answer_id for c in part],
        )
        counts.n_forward += 1
    counts.n_patched += len(run_idx)
    counts.n_skipped += len(cells) - len(run_idx)
    return values


def pair_row(tokenizer, pp: PreparedPair, clean_ld: float, corr_ld: float) -> dict[str, Any]:
    """One row of :attr:`PatchingResult.pairs`: baseline LDs, answer tokens and tokens."""
    return {
        "pair_id": pp.pair_id,
        "n_tokens": pp.n_tokens,
        "clean_logit_diff": clean_ld,
        "corrupted_logit_diff": corr_ld,
        "clean_answer_token": token_label(tokenizer, pp.clean_answer_id),
        "corrupted_answer_token": token_label(tokenizer, pp.corrupted_answer_id),
        "clean_answer_id": pp.clean_answer_id,
        "corrupted_answer_id": pp.corrupted_answer_id,
        "answer_prefix": "".join(token_label(tokenizer, t) for t in pp.answer_prefix_ids),
        "answer_tokenization": pp.answer_tokenization,
        "diff_positions": " ".join(map(str, pp.diff_positions)),
        "clean_tokens": " ".join(pp.clean_tokens),
        "corrupted_tokens": " ".join(pp.corrupted_tokens),
    }


def _cell_records(cps, cells, meta, values, base, min_ld_gap: float) -> list[tuple]:
    """Two tidy rows per cell (:data:`RESULT_COLUMNS`): its LD and its recovery."""
    k = len(cps)
    records: list[tuple] = []
    for (comp, L, p, h), cell, v in zip(meta, cells, values):
        pp = cps[cell.slot]
        clean_ld, corr_ld = float(base[cell.slot]), float(base[k + cell.slot])
        tok = pp.clean_tokens[p]
        rec = _recovery(float(v), clean_ld, corr_ld, min_ld_gap)
        head = (pp.pair_id, pp.n_tokens, L, p, tok, comp, h)
        records.append((*head, "logit_diff", float(v), clean_ld, corr_ld))
        records.append((*head, "recovery", rec, clean_ld, corr_ld))
    return records


def _sweep_chunk(bridge, cps, plan: _SweepPlan, settings: Mapping[str, Any], counts, notes):
    """Baselines, patched runs and tidy rows of one chunk: (cell records, pair rows)."""
    k = len(cps)
    base, clean_src, same = _baselines(bridge, cps, plan.hooks, settings["skip_identical"])
    counts.n_forward += 1
    cells, meta = _chunk_cells(cps, plan)
    values = _run_cells(
        bridge,
        cps,
        cells,
        base,
        clean_src,
        same,
        skip_identical=settings["skip_identical"],
        batch_size=settings["batch_size"],
        counts=counts,
    )
    pair_rows = []
    for slot, pp in enumerate(cps):
        clean_ld, corr_ld = float(base[slot]), float(base[k + slot])
        pair_rows.append(pair_row(bridge.tokenizer, pp, clean_ld, corr_ld))
        if abs(clean_ld - corr_ld) < settings["min_ld_gap"]:
            notes.append(
                f"pair {pp.pair_id!r}: clean and corrupted logit differences are equal "
                f"({clean_ld:.3g}); its recovery is NaN"
            )
    return _cell_records(cps, cells, meta, values, base, settings["min_ld_gap"]), pair_rows


def _run_chunks(bridge, plan: _SweepPlan, settings, notes: list[str], log):
    """Sweep every chunk without autograd: (cell records, pair rows, counts, seconds)."""
    import torch

    counts = _SweepCounts()
    records: list[tuple] = []
    pair_rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for chunk in plan.chunks:
            cps = [plan.prepared[i] for i in chunk]
            recs, rows = _sweep_chunk(bridge, cps, plan, settings, counts, notes)
            records += recs
            pair_rows += rows
            log(
                f"patch_sweep: {len(pair_rows)}/{len(plan.prepared)} pairs, "
                f"{counts.n_patched} patched runs, {time.perf_counter() - t0:.1f} s"
            )
    return records, pair_rows, counts, time.perf_counter() - t0


def _in_input_order(df: pd.DataFrame, pairs_df: pd.DataFrame) -> pd.DataFrame:
    """``df`` sorted (stably) by the order of its pairs in the input table."""
    order = {pid: i for i, pid in enumerate(pairs_df["pair_id"].astype(str))}
    return df.sort_values("pair_id", key=lambda s: s.map(order), kind="stable").reset_index(
        drop=True
    )


def _sweep_result(bridge, plan, pairs_df, records, pair_rows, info, notes) -> PatchingResult:
    """Assemble the tidy table, the pairs table and the settings into a :class:`PatchingResult`."""
    df = pd.DataFrame.from_records(records, columns=list(RESULT_COLUMNS))
    df["head"] = df["head"].astype("int64")
    return PatchingResult(
        df=_in_input_order(df, pairs_df),
        pairs=_in_input_order(pd.DataFrame(pair_rows), pairs_df),
        tokens={p.pair_id: p.clean_tokens for p in plan.prepared},
        corrupted_tokens={p.pair_id: p.corrupted_tokens for p in plan.prepared},
        components=plan.components,
        layers=plan.layers,
        n_heads=plan.n_heads if plan.heads else 0,
        heads=plan.heads,
        info=info,
        notes=notes,
    )


def patch_sweep(
    bridge,
    pairs,
    *,
    components: Sequence[str] = ("resid_pre", "resid_post", "attn_out", "mlp_out"),
    layers: Iterable[int] | None = None,
    positions: str | int | Sequence[int] = "all",
    heads: bool = True,
    head_positions: str = "last",
    batch_size: int = 64,
    prepend_bos: bool | str = "auto",
    min_ld_gap: float = 1e-6,
    skip_identical: bool = True,
    log: Callable[[str], Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
    only: Iterable[tuple] | None = None,
) -> PatchingResult:
    """Patch clean activations into corrupted runs, one (component, layer, position) at a time.

    ``pairs``: a DataFrame (as from :func:`load_pairs`), a path, or a list of dicts.
    ``positions``: ``"all"``, an int k (the last k positions) or a list of token indices
    (negative = from the end). ``heads``: also patch every attention head's z (if the bridge
    has ``hook_z``) at ``head_positions`` (``"last"`` or ``"positions"``). ``batch_size``: rows
    per patched forward pass. ``prepend_bos``: BOS policy (``"auto"``, True, False).
    ``skip_identical``: cells where the clean activation is bitwise equal to the corrupted one
    (e.g. every position before the first differing token, by causality) are not run; the patch
    would write the values already there, so their LD is the corrupted LD (recovery 0).
    ``min_ld_gap``: recovery is NaN for a pair with ``|LD_clean - LD_corrupted| < min_ld_gap``.
    ``only``: run just these ``(n_tokens, component, layer, position, head)`` cells (head -1 for
    components) of the sweep, with the same baselines and batching rules (the screen's
    verification); every other cell is left out of the result.
    """
    log = log or (lambda msg: None)
    notes: list[str] = []
    pairs_df, components, layers, do_heads = _check_sweep(
        bridge, pairs, components, layers, heads, batch_size, head_positions, notes, log
    )
    plan = _plan_sweep(
        bridge,
        pairs_df,
        components,
        layers,
        do_heads,
        positions,
        head_positions,
        batch_size,
        prepend_bos,
        only,
    )
    settings = dict(skip_identical=skip_identical, batch_size=batch_size, min_ld_gap=min_ld_gap)
    log(
        f"patch_sweep: {len(plan.prepared)} pairs in {plan.n_groups} length group(s), "
        f"components {components}, layers {layers[0]}..{layers[-1]}, positions {positions!r}, "
        f"heads {'yes' if do_heads else 'no'}, batch_size {batch_size}, "
        f"BOS {'prepended' if plan.prepend else 'not prepended'}"
    )
    records, pair_rows, counts, seconds = _run_chunks(bridge, plan, settings, notes, log)
    info = dict(model_info) if model_info is not None else describe_model(bridge)
    info.update(
        {
            "prepend_bos": bool(plan.prepend),
            "bos_policy": str(prepend_bos).lower(),
            "positions": repr(positions),
            "head_positions": head_positions if do_heads else "none",
            "batch_size": int(batch_size),
            "min_ld_gap": float(min_ld_gap),
            "seconds": seconds,
            "n_forward_passes": counts.n_forward,
            "n_patched_runs": counts.n_patched,
            "n_skipped_identical": counts.n_skipped,
            "metric": "logit[clean_answer] - logit[corrupted_answer] at the last position",
        }
    )
    log(
        f"patch_sweep: done, {counts.n_patched} patched runs in {counts.n_forward} forward passes "
        f"({counts.n_skipped} cells skipped as identical), {seconds:.1f} s"
    )
    return _sweep_result(bridge, plan, pairs_df, records, pair_rows, info, notes)


# --------------------------------------------------------------------------------------------
# summary across pairs


def summarize(
    df: pd.DataFrame | PatchingResult, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> pd.DataFrame:
    """Mean over pairs per cell with a percentile bootstrap interval over pairs.

    Cells are (n_tokens, component, layer, head, position, metric): pairs of different token
    lengths are summarised separately (their positions are not aligned). The bootstrap
    resamples pairs with replacement (the same ``n_boot`` resamples for every cell of a group,
    ``seed`` fixed); NaN values (undefined recovery) are left out of each mean. Columns:
    ``n_tokens, component, layer, head, position, token, metric, mean, ci_low, ci_high, n_pairs``.
    ``token`` is the clean token at that position when all pairs agree, else ``"#"`` for
    varying digits or up to three of the tokens seen there joined by ``/``.
    """
    if isinstance(df, PatchingResult):
        df = df.df
    keys = ["n_tokens", "component", "layer", "head", "position", "metric"]
    out_cols = keys[:5] + ["token", "metric", "mean", "ci_low", "ci_high", "n_pairs"]
    if df.empty:
        return pd.DataFrame(columns=out_cols)
    rng = np.random.default_rng(seed)
    alpha = (1.0 - ci) / 2.0
    parts = []
    for n_tok, g in df.groupby("n_tokens", sort=True):
        wide = g.pivot_table(
            index="pair_id", columns=keys[1:], values="value", aggfunc="first", dropna=False
        )
        X = wide.to_numpy(dtype=np.float64)  # [n_pairs, n_cells]
        n = X.shape[0]
        valid = np.isfinite(X)
        Xz = np.where(valid, X, 0.0)
        cnt = valid.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = Xz.sum(axis=0) / cnt
        if n_boot > 0 and n > 1:
            W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(
                np.float64
            )  # [n_boot, n]
            with np.errstate(invalid="ignore", divide="ignore"):
                boot = (W @ Xz) / (W @ valid.astype(np.float64))
            with warnings.catch_warnings():  # all-NaN cells (undefined recovery) stay NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                lo = np.nanquantile(boot, alpha, axis=0)
                hi = np.nanquantile(boot, 1 - alpha, axis=0)
        else:
            lo = hi = np.full(X.shape[1], np.nan)
        cells = wide.columns.to_frame(index=False)
        cells.insert(0, "n_tokens", int(n_tok))
        cells["mean"] = mean
        cells["ci_low"] = lo
        cells["ci_high"] = hi
        cells["n_pairs"] = cnt
        tok = (
            g.drop_duplicates(["pair_id", "position"])
            .groupby("position")["token"]
            .agg(lambda s: merge_token_labels(list(s), False))
        )
        cells["token"] = cells["position"].map(tok)
        parts.append(cells)
    out = pd.concat(parts, ignore_index=True)
    out = out[out["n_pairs"] > 0] if len(out) else out
    return (
        out[out_cols]
        .sort_values(
            ["n_tokens", "component", "layer", "head", "position", "metric"], kind="stable"
        )
        .reset_index(drop=True)
    )


# --------------------------------------------------------------------------------------------
# writing


def _write_attrs(f, result: PatchingResult) -> None:
    """The model description and settings as file attributes (non-scalars as JSON)."""
    import json

    for k, v in result.info.items():
        f.attrs[k] = (
            v
            if isinstance(v, (int, float, str, bool, np.integer, np.floating))
            else json.dumps(v, default=str)
        )
    f.attrs["notes"] = json.dumps(result.notes)
    f.attrs["kind"] = "patching"


def _write_pair_datasets(f, result: PatchingResult, n_pos: int) -> None:
    """Pair ids, components, layers, the per-pair baselines and the tokens of every pair."""
    import h5py

    pids = result.pairs["pair_id"].tolist()
    pix = {p: i for i, p in enumerate(pids)}
    str_dt = h5py.string_dtype("utf-8")
    f.create_dataset("pair_id", data=np.array(pids, dtype=object), dtype=str_dt)
    f.create_dataset("components", data=np.array(result.components, dtype=object), dtype=str_dt)
    f.create_dataset("layers", data=np.asarray(result.layers, dtype=np.int64))
    for col in ("n_tokens", "clean_answer_id", "corrupted_answer_id"):
        f.create_dataset(col, data=result.pairs[col].to_numpy(dtype=np.int64))
    for col in ("clean_logit_diff", "corrupted_logit_diff"):
        f.create_dataset(col, data=result.pairs[col].to_numpy(dtype=np.float64))
    for name, toks in (
        ("tokens", result.tokens),
        ("corrupted_tokens", result.corrupted_tokens),
    ):
        arr = np.full((len(pids), n_pos), "", dtype=object)
        for p, t in toks.items():
            arr[pix[p], : len(t)] = t
        f.create_dataset(name, data=arr, dtype=str_dt)


def _write_cell_arrays(f, result: PatchingResult, n_pos: int) -> None:
    """The LD and recovery arrays of the components and, if patched, of the heads."""
    pix = {p: i for i, p in enumerate(result.pairs["pair_id"].tolist())}
    cix = {c: i for i, c in enumerate(result.components)}
    lix = {L: i for i, L in enumerate(result.layers)}
    n_pairs, n_layers = len(result.pairs), len(result.layers)
    df = result.df
    plain = df[df["component"] != HEAD_COMPONENT]
    for metric in METRICS:
        arr = np.full((n_pairs, len(result.components), n_layers, n_pos), np.nan)
        m = plain[plain["metric"] == metric]
        if len(m):
            arr[
                m["pair_id"].map(pix).to_numpy(),
                m["component"].map(cix).to_numpy(),
                m["layer"].map(lix).to_numpy(),
                m["position"].to_numpy(),
            ] = m["value"].to_numpy()
        f.create_dataset(metric, data=arr)
    if not result.heads:
        return
    hd = df[df["component"] == HEAD_COMPONENT]
    for metric in METRICS:
        arr = np.full((n_pairs, n_layers, result.n_heads, n_pos), np.nan)
        m = hd[hd["metric"] == metric]
        if len(m):
            arr[
                m["pair_id"].map(pix).to_numpy(),
                m["layer"].map(lix).to_numpy(),
                m["head"].to_numpy(),
                m["position"].to_numpy(),
            ] = m["value"].to_numpy()
        f.create_dataset(f"head_{metric}", data=arr)


def write_patching(
    result: PatchingResult, csv_path: str | os.PathLike, h5_path: str | os.PathLike | None = None
) -> None:
    """Write the tidy table to ``csv_path`` and full arrays to ``h5_path`` (both atomically).

    HDF5 layout (positions are token indices 0..max_tokens-1; NaN where a pair has no such cell):

    * ``logit_diff``, ``recovery``: ``[n_pairs, n_components, n_layers, n_positions]``
    * ``head_logit_diff``, ``head_recovery``: ``[n_pairs, n_layers, n_heads, n_positions]``
      (if heads)
    * ``pair_id``, ``components`` (strings), ``layers`` (ints), ``n_tokens``,
      ``clean_logit_diff``, ``corrupted_logit_diff``, ``clean_answer_id``, ``corrupted_answer_id``
    * ``tokens``, ``corrupted_tokens``: ``[n_pairs, n_positions]`` display strings ("" beyond a
      pair's length); ``token_ids`` is not stored (re-tokenize with the recorded BOS policy).
    * attrs: the model description and settings of :attr:`PatchingResult.info`, ``notes``.
    """
    import h5py

    with atomic_path(csv_path) as tmp:
        result.df.to_csv(tmp, index=False)
    if h5_path is None:
        return
    n_pos = int(result.pairs["n_tokens"].max())
    with atomic_path(h5_path) as tmp:
        with h5py.File(tmp, "w") as f:
            _write_attrs(f, result)
            _write_pair_datasets(f, result, n_pos)
            _write_cell_arrays(f, result, n_pos)
