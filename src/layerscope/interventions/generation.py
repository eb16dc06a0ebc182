"""Generation-time activation patching: does the clean answer come back when the model *generates*?

The logit-difference sweep (:mod:`layerscope.interventions.patching`) reads one next-token
distribution. This module does what the activation-patching methodology does by hand: run the
corrupted prompt, replace the activation at one (component, layer, position) with the clean run's,
let the model generate greedily, extract the answer from the generated text and count whether it is
the clean answer.

Positions
---------
A prompt has ``T`` tokens at sequence positions ``0 .. T-1`` (BOS included when prepended).
Generation step ``k`` (k = 1, 2, ...) is the ``k``-th generated token; it sits at sequence position
``T - 1 + k``. The forward pass that produces token ``k + 1`` is the first to process position
``T - 1 + k``, so

* a prompt position ``p`` (label ``"p"``, e.g. ``"6"``) is patched in the prefill pass and changes
  every generated token;
* ``diff`` patches, jointly, the prompt positions where the pair's clean and corrupted tokens
  differ (the clean digit of a number comparison), whatever their index in each pair;
* ``genK`` (label ``"gen1"``, ``"gen2"``, ...) patches the activation at the position of generated
  token ``K``: it can change tokens ``K + 1`` onwards, never token ``K`` itself, and needs
  ``K <= max_new_tokens - 1``. The patched value is the **clean run's activation at the same
  step**: the clean prompt generates its own continuation (greedily, unpatched) and its activation
  at position ``T - 1 + K`` (where the clean run holds *its* K-th token) is written over the
  corrupted run's at that position. For ``resid_pre`` of layer 0 that replaces the corrupted run's
  K-th token embedding by the clean run's.

Ranges are patched as one intervention: ``"prompt"`` (every prompt position at once) and
``"genA-B"`` (steps A..B at once, e.g. ``"gen1-3"`` = the first three generated tokens).

Engine interface
----------------
The loop needs only a *stepper* (:class:`Stepper`): ``hooks(fwd_hooks=[(name, fn)])``, a
context manager under which TransformerLens-style hook functions ``fn(tensor, hook=...)`` fire
(a returned tensor replaces the activation), and ``step(input_ids, past, start)``, one forward
pass over the new tokens at positions ``start ..`` with the KV cache ``past``, returning the
last position's logits and the extended cache. :class:`BridgeStepper` adapts a TransformerBridge;
any engine with the same two methods can be passed instead.

Batching
--------
Pairs are grouped by token length (clean and corrupted prompts of a pair must have equal length),
so no padding is ever needed. Every batch row is one (pair, cell) variant with its own patch;
hooks index the rows. Generation is greedy (``argmax``, ties to the lowest token id), always
``max_new_tokens`` tokens (no early stop; the text is cut at the first EOS token). Cells whose
clean activation equals the corrupted run's own bit for bit at every patched position (prompt
positions before the first differing token, by causality) are not run: the patch would write what
is already there, so their generation is the unpatched corrupted one.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from layerscope.engine.loading import HOOKS, hook_name, model_device
from layerscope.engine.tokens import resolve_bos, tokenize_prompts
from layerscope.errors import InputError, LayerscopeError
from layerscope.interventions.patching import TokenPair

#: Default answer rule: the first number (sign and decimals allowed) or word in the generated text.
DEFAULT_ANSWER_REGEX = r"[-+]?\d+(?:\.\d+)?|\w+"
COMPONENTS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
#: component/position of the two unpatched runs in the tables
BASELINE = "unpatched"
ROW_COLUMNS = (
    "pair_id",
    "n_tokens",
    "component",
    "layer",
    "position",
    "position_kind",
    "patched_positions",
    "generated_text",
    "generated_ids",
    "answer",
    "matches_clean",
    "matches_corrupted",
    "clean_answer",
    "corrupted_answer",
)
_GEN = re.compile(r"^gen(\d+)$")
_GEN_RANGE = re.compile(r"^gen(\d+)-(\d+)$")


# --------------------------------------------------------------------------------------------
# the engine interface


class Stepper(Protocol):
    """What the generation loop needs from a model (see the module docstring)."""

    def hooks(
        self, fwd_hooks: Sequence[tuple[str, Callable]]
    ) -> contextlib.AbstractContextManager: ...

    def step(self, input_ids, past: Any, start: int) -> tuple[Any, Any]: ...


class BridgeStepper:
    """A TransformerBridge as a :class:`Stepper` (its HF cache, its TransformerLens hooks).

    transformers 5.24 passes a decoder block's KV cache to attention as ``cache=``, while the
    bridge's attention components read ``past_key_values=`` and otherwise leave the cache empty
    (every cached step would then attend to itself only). :meth:`session` installs forward
    pre-hooks that hand the cache over under the name the bridge reads; without them cached
    generation is wrong (see tests/test_generation.py).
    """

    def __init__(self, bridge) -> None:
        self.bridge = bridge

    @property
    def hook_names(self) -> set[str]:
        return set(self.bridge.hook_dict)

    @property
    def device(self):
        return model_device(self.bridge)

    @property
    def n_layers(self) -> int:
        return int(self.bridge.cfg.n_layers)

    def hooks(self, fwd_hooks):
        return self.bridge.hooks(fwd_hooks=list(fwd_hooks))

    @contextlib.contextmanager
    def session(self) -> Iterator[BridgeStepper]:
        def hand_over(module, args, kwargs):
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return args, kwargs

        handles = [
            block.attn.register_forward_pre_hook(hand_over, with_kwargs=True)
            for block in self.bridge.blocks
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def step(self, input_ids, past, start: int):
        import torch

        B, n = input_ids.shape
        mask = torch.ones((B, start + n), dtype=torch.long, device=input_ids.device)
        pos = torch.arange(start, start + n, device=input_ids.device).expand(B, n)
        # ``cache=``, as the pinned transformers names it (``past_key_values=`` is deprecated and
        # warns on every step); the session's hand-over passes it on to the bridge's attention.
        logits, past = self.bridge(
            input_ids,
            return_type="logits_and_cache",
            cache=past,
            use_cache=True,
            attention_mask=mask,
            position_ids=pos,
        )
        if start > 0 and (past is None or past.get_seq_length() != start + n):
            raise LayerscopeError("the model's KV cache did not grow with the generated tokens")
        return logits[:, -1, :], past


class NativeStepper:
    """The native engine (:mod:`layerscope.engine.native`) as a :class:`Stepper`: the model's own
    attention and KV cache (no hand-over needed), hooks at the same TransformerLens names."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def hook_names(self) -> set[str]:
        return set(self.engine.hook_dict)

    @property
    def device(self):
        return self.engine.device

    @property
    def n_layers(self) -> int:
        return int(self.engine.cfg.n_layers)

    def hooks(self, fwd_hooks):
        return self.engine.hooks(fwd_hooks=list(fwd_hooks))

    @contextlib.contextmanager
    def session(self) -> Iterator[NativeStepper]:
        yield self

    def step(self, input_ids, past, start: int):
        import torch

        B, n = input_ids.shape
        mask = torch.ones((B, start + n), dtype=torch.long, device=input_ids.device)
        pos = torch.arange(start, start + n, device=input_ids.device).expand(B, n)
        out = self.engine(
            input_ids,
            attention_mask=mask,
            position_ids=pos,
            cache=past,
            use_cache=True,
            return_type="output",
        )
        return out.logits[:, -1, :], out.cache


def stepper_for(model) -> BridgeStepper | NativeStepper:
    """The stepper of a model from :func:`layerscope.engine.loading.load_engine` (bridge or
    native)."""
    return BridgeStepper(model) if hasattr(model, "original_model") else NativeStepper(model)


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class Patch:
    """Rows ``r`` get ``source[s, p]`` written at absolute position ``p`` of one hook."""

    rows: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)

    def add(self, row: int, positions: Sequence[int], source: int) -> None:
        self.rows += [row] * len(positions)
        self.positions += list(positions)
        self.sources += [source] * len(positions)


def _patch_hook(patch: Patch, source, start: int, n: int, device):
    """A hook that writes the entries of ``patch`` whose position lies in ``[start, start + n)``."""
    import torch

    p = np.asarray(patch.positions, dtype=np.int64)
    keep = (p >= start) & (p < start + n)
    if not keep.any():
        return None
    r = torch.as_tensor(np.asarray(patch.rows)[keep], device=device)
    s = torch.as_tensor(np.asarray(patch.sources)[keep], device=device)
    pa = torch.as_tensor(p[keep], device=device)

    def hook(tensor, hook=None):
        out = tensor.clone()
        out[r, pa - start] = source[s, pa].to(out.dtype)
        return out

    return hook


def _capture_hook(store: list):
    def hook(tensor, hook=None):
        store.append(tensor.detach().clone())
        return None

    return hook


def greedy_generate(
    stepper: Stepper,
    input_ids,
    max_new_tokens: int,
    *,
    patches: Mapping[str, Patch] | None = None,
    sources: Mapping[str, Any] | None = None,
    capture: Sequence[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """Greedy generation of ``max_new_tokens`` tokens for every row of ``input_ids`` ``[B, T]``.

    ``patches[hook]`` says which row gets which source row's activation at which absolute
    position; ``sources[hook]`` is ``[n_sources, >= T + max_new_tokens - 1, ...]``. ``capture``:
    hooks whose activations are returned for every processed position, ``[B, T + N - 1, ...]``.
    Returns (generated token ids ``[B, N]``, captured activations).
    """
    import torch

    patches, sources = patches or {}, sources or {}
    stores: dict[str, list] = {h: [] for h in capture}
    cur, past, start, out = input_ids, None, 0, []
    for _ in range(int(max_new_tokens)):
        n = cur.shape[1]
        fwd = [(h, _capture_hook(stores[h])) for h in capture]
        for h, patch in patches.items():
            fn = _patch_hook(patch, sources[h], start, n, input_ids.device)
            if fn is not None:
                fwd.append((h, fn))
        with stepper.hooks(fwd):
            logits, past = stepper.step(cur, past, start)
        nxt = logits.argmax(dim=-1)
        out.append(nxt)
        start += n
        cur = nxt[:, None]
    captured = {h: torch.cat(v, dim=1) for h, v in stores.items() if v}
    return torch.stack(out, dim=1), captured


# --------------------------------------------------------------------------------------------
# cells and positions


@dataclass(frozen=True)
class GenCell:
    """One intervention: ``component`` at ``layer``, at position label ``position``."""

    component: str
    layer: int
    position: str  # "6", "diff", "gen2", "prompt", "gen1-3"
    kind: str  # "prompt", "diff", "gen", "range"

    @property
    def hook(self) -> str:
        return hook_name(self.component, self.layer)


def position_kind(label: str) -> str:
    """Kind of a position label: ``"prompt"`` (an index), ``"diff"``, ``"gen"`` (``genK``) or
    ``"range"`` (``prompt``, ``genA-B``)."""
    if label == "diff":
        return "diff"
    if label == "prompt" or _GEN_RANGE.match(label):
        return "range"
    if _GEN.match(label):
        return "gen"
    if re.fullmatch(r"-?\d+", label):
        return "prompt"
    raise LayerscopeError(
        f"position {label!r} not understood; expected a prompt index, 'diff', 'genK', "
        "'prompt' or 'genA-B'"
    )


def absolute_positions(
    label: str, n_tokens: int, max_new_tokens: int, diff: Sequence[int] = ()
) -> list[int]:
    """Sequence positions a label patches in a prompt of ``n_tokens`` tokens (see the module
    docstring); ``diff``: the pair's differing prompt positions (for the label ``"diff"``)."""
    T, N = int(n_tokens), int(max_new_tokens)
    if label == "diff":
        if not diff:
            raise LayerscopeError("position 'diff' needs the pair's differing positions")
        return sorted(int(d) for d in diff)
    if label == "prompt":
        return list(range(T))
    m = _GEN.match(label) or _GEN_RANGE.match(label)
    if m:
        a = int(m.group(1))
        b = int(m.group(2)) if m.lastindex == 2 else a
        if not 1 <= a <= b or b > N - 1:
            raise LayerscopeError(
                f"position {label!r}: generation steps run from 1 to max_new_tokens - 1 "
                f"= {N - 1} (step K's activation is read when token K + 1 is generated)"
            )
        return [T - 1 + k for k in range(a, b + 1)]
    p = int(label)
    q = p + T if p < 0 else p
    if not 0 <= q < T:
        raise LayerscopeError(f"prompt position {p} does not exist in a {T}-token prompt")
    return [q]


def expand_positions(positions, n_tokens: int, max_new_tokens: int) -> list[str]:
    """Single-position labels for one prompt length: ``"all"`` (every prompt position and every
    step), an int k (the last k prompt positions), or a list of ints (negative: from the end) and
    ``"genK"`` strings."""
    T, N = int(n_tokens), int(max_new_tokens)
    if isinstance(positions, str) and positions == "all":
        return [str(p) for p in range(T)] + ["diff"] + [f"gen{k}" for k in range(1, N)]
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        if positions < 1:
            raise LayerscopeError(
                f"positions={positions}: the number of last prompt positions must be >= 1"
            )
        return [str(p) for p in range(max(0, T - int(positions)), T)]
    out: list[str] = []
    for item in positions:
        label = str(item).strip()
        kind = position_kind(label)
        if kind == "range":
            raise LayerscopeError(f"position {label!r} is a range; list it under ranges")
        if kind == "prompt":
            label = str(absolute_positions(label, T, N)[0])
        elif kind == "gen":
            absolute_positions(label, T, N)  # validates the step
        if label not in out:
            out.append(label)
    if not out:
        raise LayerscopeError("positions is an empty list")
    return out


def build_cells(
    components: Sequence[str], layers: Sequence[int], labels: Sequence[str], ranges: Sequence[str]
) -> list[GenCell]:
    """Every (component, layer, position) cell, then every (component, layer, range) cell."""
    cells = [
        GenCell(c, int(L), p, position_kind(p)) for c in components for L in layers for p in labels
    ]
    for r in ranges:
        if position_kind(r) != "range":
            raise LayerscopeError(f"range {r!r} not understood; expected 'prompt' or 'genA-B'")
        cells += [GenCell(c, int(L), r, "range") for c in components for L in layers]
    return cells


# --------------------------------------------------------------------------------------------
# answers


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_REGEX) -> str:
    """The answer in ``text``: the first match of ``pattern`` (its first group if it has one), ""
    when nothing matches. The default takes the first number or word."""
    m = re.search(pattern, text)
    if m is None:
        return ""
    return (m.group(1) if m.re.groups else m.group(0)) or ""


def normalize_expected(answer: str, pattern: str = DEFAULT_ANSWER_REGEX) -> str:
    """An expected answer (``clean_answer``/``corrupted_answer``) read by the same rule, so that
    ``" 586"`` is compared as ``"586"``; the stripped text where the rule finds nothing."""
    return extract_answer(answer, pattern) or answer.strip()


def decode_generated(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids, cut at the first EOS token (generation never stops early)."""
    ids = [int(i) for i in ids]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------
# the sweep


@dataclass
class GenPair(TokenPair):
    """One pair tokenized for generation (raw prompts; the model generates the answer)."""

    clean_answer: str  # normalized by the answer rule
    corrupted_answer: str


def tokenize_pairs(
    tokenizer, pairs: pd.DataFrame, *, prepend_bos: bool, answer_regex: str
) -> list[GenPair]:
    """Tokenize clean and corrupted prompts; unequal lengths are an :class:`InputError` naming the
    line."""
    out = []
    for i in range(len(pairs)):
        rec = pairs.iloc[i]
        pid = str(rec["pair_id"])
        line = int(rec["source_line"]) if "source_line" in pairs.columns else None
        where = {"file": pairs.attrs.get("source"), "line": line, "row": None if line else i + 1}
        cp, kp = tokenize_prompts(
            tokenizer, [str(rec["clean"]), str(rec["corrupted"])], prepend_bos=prepend_bos
        )
        if len(cp) != len(kp):
            raise InputError(
                f"pair {pid!r}: clean and corrupted prompts tokenize to different lengths "
                f"(clean {len(cp)} tokens, corrupted {len(kp)}); generation patching needs "
                "aligned prompts",
                field="corrupted",
                **where,
            )
        ca, ka = (
            normalize_expected(str(rec[c]), answer_regex)
            for c in ("clean_answer", "corrupted_answer")
        )
        if ca == ka:
            raise InputError(
                f"pair {pid!r}: the answer rule reads the same answer {ca!r} from clean_answer "
                "and corrupted_answer",
                field="corrupted_answer",
                **where,
            )
        out.append(GenPair(pid, cp, kp, ca, ka))
    return out


def _chunks(pairs: Sequence[GenPair], per_chunk: int) -> list[list[int]]:
    """Indices of pairs grouped by token length, cut into chunks of ``per_chunk``."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(pairs):
        by_len.setdefault(p.n_tokens, []).append(i)
    return [
        idx[j : j + per_chunk]
        for _, idx in sorted(by_len.items())
        for j in range(0, len(idx), per_chunk)
    ]


def _same_as_corrupted(clean, corrupted, positions: Sequence[int]) -> bool:
    """Whether the clean activation equals the corrupted run's bit for bit at every position."""
    return bool((clean[list(positions)] == corrupted[list(positions)]).all())


def _run_baselines(
    stepper: Stepper, group: Sequence[GenPair], hooks: Sequence[str], max_new_tokens: int
):
    """Unpatched clean and corrupted generations of one chunk, capturing every hook to patch."""
    import torch

    ids = torch.tensor(
        [p.clean_ids for p in group] + [p.corrupted_ids for p in group], device=stepper.device
    )
    toks, acts = greedy_generate(stepper, ids, max_new_tokens, capture=hooks)
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise LayerscopeError(f"hooks did not fire: {', '.join(missing[:10])}")
    return toks.cpu().numpy(), acts


def _run_variants(
    stepper: Stepper,
    group: Sequence[GenPair],
    todo: Sequence[tuple[int, GenCell, list[int]]],
    acts: Mapping[str, Any],
    source_offset: int,
    max_new_tokens: int,
    batch_size: int,
):
    """Patched generations: ``todo`` = (slot, cell, absolute positions).

    Returns the generated ids, ``[len(todo), N]``.
    """
    import torch

    out = []
    for b in range(0, len(todo), batch_size):
        part = todo[b : b + batch_size]
        patches: dict[str, Patch] = {}
        for r, (slot, cell, pos) in enumerate(part):
            patches.setdefault(cell.hook, Patch()).add(r, pos, source_offset + slot)
        ids = torch.tensor(
            [group[slot].corrupted_ids for slot, _, _ in part], device=stepper.device
        )
        toks, _ = greedy_generate(
            stepper, ids, max_new_tokens, patches=patches, sources={h: acts[h] for h in patches}
        )
        out.append(toks.cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, max_new_tokens), dtype=np.int64)


def _row(
    pair: GenPair,
    component: str,
    layer: int,
    position: str,
    kind: str,
    patched: Sequence[int],
    generated: tuple[str, str],
    answer_regex: str,
) -> dict[str, Any]:
    text, ids = generated
    answer = extract_answer(text, answer_regex)
    return {
        "pair_id": pair.pair_id,
        "n_tokens": pair.n_tokens,
        "component": component,
        "layer": int(layer),
        "position": position,
        "position_kind": kind,
        "patched_positions": " ".join(map(str, patched)),
        "generated_text": text,
        "generated_ids": ids,
        "answer": answer,
        "matches_clean": answer == pair.clean_answer,
        "matches_corrupted": answer == pair.corrupted_answer,
        "clean_answer": pair.clean_answer,
        "corrupted_answer": pair.corrupted_answer,
    }


def _generated(tokenizer, ids) -> tuple[str, str]:
    """(text cut at EOS, every generated id space-joined)."""
    return decode_generated(tokenizer, ids), " ".join(str(int(i)) for i in ids)


def _chunk_rows(
    stepper,
    tokenizer,
    group: Sequence[GenPair],
    cells: Sequence[GenCell],
    settings: Mapping[str, Any],
    stats: dict[str, int],
) -> list[dict[str, Any]]:
    """Every row of one chunk of equal-length pairs: the two unpatched runs, then each cell."""
    N, regex, k = settings["max_new_tokens"], settings["answer_regex"], len(group)
    T = group[0].n_tokens
    hooks = sorted({c.hook for c in cells})
    base, acts = _run_baselines(stepper, group, hooks, N)
    text = [_generated(tokenizer, t) for t in base]
    rows = [
        _row(p, BASELINE, -1, f"{side}_prompt", "none", [], text[i + off], regex)
        for side, off in (("clean", 0), ("corrupted", k))
        for i, p in enumerate(group)
    ]
    source_offset = 0 if settings["source"] == "clean" else k
    todo, reuse = [], []
    for slot in range(k):
        for cell in cells:
            pos = absolute_positions(cell.position, T, N, group[slot].diff_positions)
            same = settings["skip_identical"] and _same_as_corrupted(
                acts[cell.hook][source_offset + slot], acts[cell.hook][k + slot], pos
            )
            (reuse if same else todo).append((slot, cell, pos))
    ids = _run_variants(stepper, group, todo, acts, source_offset, N, settings["batch_size"])
    done = {(s, c): _generated(tokenizer, t) for (s, c, _), t in zip(todo, ids)}
    for slot, cell, _ in reuse:
        done[(slot, cell)] = text[k + slot]  # the patch writes what is already there
    for slot in range(k):
        for cell in cells:
            pos = absolute_positions(cell.position, T, N, group[slot].diff_positions)
            rows.append(
                _row(
                    group[slot],
                    cell.component,
                    cell.layer,
                    cell.position,
                    cell.kind,
                    pos,
                    done[(slot, cell)],
                    regex,
                )
            )
    stats["patched"] += len(todo)
    stats["skipped"] += len(reuse)
    return rows


def generation_sweep(
    stepper: Stepper,
    tokenizer,
    pairs: pd.DataFrame,
    *,
    components: Sequence[str] = COMPONENTS,
    layers: Sequence[int],
    positions="all",
    ranges: Sequence[str] = ("prompt",),
    max_new_tokens: int = 4,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    prepend_bos: bool | str = "auto",
    batch_size: int = 64,
    source: str = "clean",
    skip_identical: bool = True,
    log: Callable[[str], Any] | None = None,
) -> pd.DataFrame:
    """Generate from every corrupted prompt with the clean activation patched at every cell.

    Returns one row per (pair, cell) with :data:`ROW_COLUMNS`, plus two rows per pair for the
    unpatched runs (``component == "unpatched"``, ``layer == -1``, ``position`` ``clean_prompt`` or
    ``corrupted_prompt``). ``source="corrupted"`` patches the corrupted run's own activations (a
    control that must reproduce the corrupted generation). See the module docstring for positions.
    """
    log = log or (lambda msg: None)
    _check_settings(stepper, components, max_new_tokens, batch_size, source, answer_regex)
    layers = _check_layers(stepper, layers)
    prepend = resolve_bos(tokenizer, prepend_bos)
    gpairs = tokenize_pairs(tokenizer, pairs, prepend_bos=prepend, answer_regex=answer_regex)
    settings = {
        "max_new_tokens": int(max_new_tokens),
        "answer_regex": answer_regex,
        "source": source,
        "skip_identical": bool(skip_identical),
        "batch_size": int(batch_size),
    }
    stats = {"patched": 0, "skipped": 0}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    import torch

    with torch.inference_mode(), _session(stepper):
        for chunk in _chunks(gpairs, max(1, batch_size // 2)):
            group = [gpairs[i] for i in chunk]
            labels = expand_positions(positions, group[0].n_tokens, max_new_tokens)
            cells = build_cells(components, layers, labels, ranges)
            rows += _chunk_rows(stepper, tokenizer, group, cells, settings, stats)
            log(
                f"generation_sweep: {len({r['pair_id'] for r in rows})}/{len(gpairs)} pairs, "
                f"{stats['patched']} patched generations, {time.perf_counter() - t0:.1f} s"
            )
    order = {p.pair_id: i for i, p in enumerate(gpairs)}
    df = pd.DataFrame(rows, columns=list(ROW_COLUMNS))
    df = df.sort_values("pair_id", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    df.attrs.update(
        {
            "seconds": time.perf_counter() - t0,
            "n_patched_generations": stats["patched"],
            "n_skipped_identical": stats["skipped"],
            "prepend_bos": bool(prepend),
        }
    )
    return df


def _session(stepper):
    session = getattr(stepper, "session", None)
    return session() if session is not None else contextlib.nullcontext(stepper)


def _check_layers(stepper, layers) -> list[int]:
    n = getattr(stepper, "n_layers", None)
    out = sorted({int(L) for L in layers})
    if not out or (n is not None and not all(0 <= L < n for L in out)):
        raise LayerscopeError(
            f"layers {list(layers)} invalid; the model has layers 0..{(n or 0) - 1}"
        )
    return out


def _check_settings(stepper, components, max_new_tokens, batch_size, source, answer_regex) -> None:
    bad = [c for c in components if c not in HOOKS]
    if bad or not components:
        raise LayerscopeError(f"unknown component(s) {bad}; expected some of {list(HOOKS)}")
    names = getattr(stepper, "hook_names", None)
    if names is not None:
        absent = [c for c in components if hook_name(c, 0) not in names]
        if absent:
            raise LayerscopeError(f"component(s) {absent} not available for this model")
    if int(max_new_tokens) < 1 or int(batch_size) < 1:
        raise LayerscopeError(
            f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be >= 1"
        )
    if source not in ("clean", "corrupted"):
        raise LayerscopeError(f"source {source!r}: expected 'clean' or 'corrupted'")
    try:
        re.compile(answer_regex)
    except re.error as exc:
        raise LayerscopeError(
            f"answer_regex {answer_regex!r} is not a regular expression: {exc}"
        ) from None


# --------------------------------------------------------------------------------------------
# pre-flight: the clean runs alone, before any patching


def clean_run_check(
    stepper: Stepper,
    tokenizer,
    pairs: pd.DataFrame,
    *,
    max_new_tokens: int,
    answer_regex: str = DEFAULT_ANSWER_REGEX,
    prepend_bos: bool | str = "auto",
    batch_size: int = 64,
) -> list[str]:
    """Generate from the clean prompts only (one unpatched run per pair) and judge the setup.

    Refuses (:class:`LayerscopeError`) when every recovery rate could only be 0 whatever the model
    does: every clean generation blank (``max_new_tokens`` too small), or the answer rule reading
    nothing from any of them. Returns named warnings (``clean_run_never_clean``: the clean prompt
    never gives the clean answer, so recovery has nothing to recover). Cheap next to the sweeps,
    so the patching job runs it before them."""
    import torch

    gpairs = tokenize_pairs(
        tokenizer, pairs, prepend_bos=resolve_bos(tokenizer, prepend_bos), answer_regex=answer_regex
    )
    texts = {}
    with torch.inference_mode(), _session(stepper):
        for chunk in _chunks(gpairs, max(1, int(batch_size))):
            ids = torch.tensor([gpairs[i].clean_ids for i in chunk], device=stepper.device)
            toks, _ = greedy_generate(stepper, ids, max_new_tokens)
            for i, t in zip(chunk, toks.cpu().numpy()):
                texts[i] = decode_generated(tokenizer, t)
    texts = [texts[i] for i in range(len(gpairs))]
    return judge_clean_runs(gpairs, texts, max_new_tokens, answer_regex)


def judge_clean_runs(
    gpairs: Sequence[GenPair], texts: Sequence[str], max_new_tokens: int, answer_regex: str
) -> list[str]:
    """The refusals and warnings of :func:`clean_run_check` from the clean generations."""
    n, key = len(texts), "patching.generation"
    answers = [extract_answer(t, answer_regex) for t in texts]
    if all(t.strip() == "" for t in texts):
        raise LayerscopeError(
            f"every one of {n} clean generations is blank within max_new_tokens={max_new_tokens} "
            f"(first: {texts[0]!r}), so every answer is empty and every recovery rate 0; "
            f"raise {key}.max_new_tokens"
        )
    if not any(answers):
        raise LayerscopeError(
            f"answer_regex {answer_regex!r} matched none of {n} clean generations "
            f"(first: {texts[0]!r}), so every answer is empty and every recovery rate 0; "
            f"set {key}.answer_regex"
        )
    hits = sum(a == p.clean_answer for a, p in zip(answers, gpairs))
    if hits:
        return []
    return [
        f"clean_run_never_clean: the clean prompt gave the clean answer in 0 of {n} pairs "
        f"(first: generated {texts[0]!r}, read {answers[0]!r}, expected "
        f"{gpairs[0].clean_answer!r}); recovery rates are then 0 by construction: check the "
        f"pairs file's clean_answer column, {key}.max_new_tokens and {key}.answer_regex"
    ]


# --------------------------------------------------------------------------------------------
# summary: recovery rate with its interval and the n a goal needs

SUMMARY_COLUMNS = (
    "n_tokens",
    "component",
    "layer",
    "position",
    "position_kind",
    "n_pairs",
    "n_clean",
    "recovery_rate",
    "ci_low",
    "ci_high",
    "half_width",
    "corrupted_answer_rate",
    "unpatched_rate",
    "clean_run_rate",
    "n_for_half_width",
    "n_for_power",
)


def _pooled(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of cells every pair has (diff, generation steps, ranges, unpatched), again with n_tokens
    0."""
    pool = rows[rows["position_kind"].isin(["diff", "gen", "range", "none"])].copy()
    pool["n_tokens"] = 0
    return pool


def summarize_generation(rows: pd.DataFrame, precision: Mapping[str, Any]) -> pd.DataFrame:
    """Recovery rate per cell (share of pairs whose generated answer is the clean one).

    Cells are grouped by ``n_tokens`` like the logit-difference summary (prompt positions of
    different lengths are not aligned); ``diff``, generation steps, ranges and the unpatched runs
    are also pooled over every pair with ``n_tokens == 0``. Per cell: the Wilson interval at
    ``precision["confidence"]`` (:func:`layerscope.analysis.power.wilson_interval`), its half-width,
    and ``n_for_half_width`` / ``n_for_power`` from
    :func:`layerscope.analysis.power.rate_precision`, where the rate to beat (p0) is the unpatched
    corrupted run's clean-answer rate of the same group. ``unpatched_rate`` is that p0;
    ``clean_run_rate`` is how often the clean prompt itself gives the clean answer (recovery cannot
    be expected beyond it).
    """
    from layerscope.analysis.power import rate_precision

    rows = pd.concat([rows, _pooled(rows)], ignore_index=True)
    keys = ["n_tokens", "component", "layer", "position", "position_kind"]
    base = rows[rows["component"] == BASELINE]
    p0 = base[base["position"] == "corrupted_prompt"].groupby("n_tokens")["matches_clean"].mean()
    p_clean = base[base["position"] == "clean_prompt"].groupby("n_tokens")["matches_clean"].mean()
    g = (
        rows.groupby(keys, sort=False)
        .agg(
            n_pairs=("matches_clean", "size"),
            n_clean=("matches_clean", "sum"),
            n_corrupted=("matches_corrupted", "sum"),
        )
        .reset_index()
    )
    out = []
    for rec in g.itertuples(index=False):
        n, k = int(rec.n_pairs), int(rec.n_clean)
        prec = rate_precision(
            k,
            n,
            half_width=precision["half_width"],
            effect=precision["rate_effect"],
            p0=float(p0.get(rec.n_tokens, 0.0)),
            conf=precision["confidence"],
            power=precision["power"],
        )
        out.append(
            {
                **{c: getattr(rec, c) for c in keys},
                "n_pairs": n,
                "n_clean": k,
                "recovery_rate": k / n,
                "ci_low": prec["ci_low"],
                "ci_high": prec["ci_high"],
                "half_width": prec["half_width"],
                "corrupted_answer_rate": int(rec.n_corrupted) / n,
                "unpatched_rate": float(p0.get(rec.n_tokens, np.nan)),
                "clean_run_rate": float(p_clean.get(rec.n_tokens, np.nan)),
                "n_for_half_width": prec["n_for_half_width"],
                "n_for_power": prec["n_for_power"],
            }
        )
    df = pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))
    for c in ("n_for_half_width", "n_for_power"):
        df[c] = df[c].astype("Int64")
    return df.sort_values(["n_tokens", "component", "layer"], kind="stable").reset_index(drop=True)


def length_map(rows: pd.DataFrame, sweep_pairs: pd.DataFrame) -> dict[int, int]:
    """Generation prompt length -> the logit-difference sweep's input length for the same pairs.

    The sweep appends the answer tokens the two answers share (e.g. the space before a number) to
    both prompts, so its inputs can be longer; prompt position indices are the same. A length whose
    pairs map to several sweep lengths is left out.
    """
    gen = rows.drop_duplicates("pair_id").set_index("pair_id")["n_tokens"]
    sweep = sweep_pairs.set_index("pair_id")["n_tokens"]
    both = pd.DataFrame({"gen": gen, "sweep": sweep.reindex(gen.index)}).dropna()
    out = {}
    for T, g in both.groupby("gen"):
        if g["sweep"].nunique() == 1:
            out[int(T)] = int(g["sweep"].iloc[0])
    return out


def add_logit_recovery(
    summary: pd.DataFrame, ld_summary: pd.DataFrame, lengths: Mapping[int, int]
) -> pd.DataFrame:
    """Beside each prompt-position cell, the logit-difference recovery of the same cell (mean and
    bootstrap interval from :func:`layerscope.interventions.patching.summarize`); ``lengths`` from
    :func:`length_map`. NaN where the forward sweep has no such cell (``diff``, generation steps,
    ranges, positions it did not sweep); ``logit_recovery_note`` then says why (empty where the
    value is there)."""
    ld = ld_summary[(ld_summary["metric"] == "recovery") & (ld_summary["head"] == -1)]
    ld = ld[["n_tokens", "component", "layer", "position", "mean", "ci_low", "ci_high"]].rename(
        columns={
            "n_tokens": "sweep_n_tokens",
            "mean": "logit_recovery",
            "ci_low": "logit_recovery_ci_low",
            "ci_high": "logit_recovery_ci_high",
        }
    )
    ld = ld.assign(position=ld["position"].astype(int).astype(str), position_kind="prompt")
    out = summary.assign(sweep_n_tokens=summary["n_tokens"].map(lambda n: lengths.get(int(n), -1)))
    out = out.merge(
        ld,
        on=["sweep_n_tokens", "component", "layer", "position", "position_kind"],
        how="left",
        indicator="_found",
    )
    out["logit_recovery_note"] = [
        _logit_recovery_note(kind, found == "both", value, n_tok, lengths)
        for kind, found, value, n_tok in zip(
            out["position_kind"], out["_found"], out["logit_recovery"], out["n_tokens"]
        )
    ]
    return out.drop(columns=["sweep_n_tokens", "_found"])


def _logit_recovery_note(
    kind: str, found: bool, value: float, n_tokens: int, lengths: Mapping[int, int]
) -> str:
    """Why a generation cell has no logit-difference recovery beside it ("" when it has one)."""
    if kind != "prompt":
        what = "an unpatched run" if kind == "none" else f"a {kind} cell"
        return f"{what}: the logit-difference sweep patches one prompt position at a time"
    if int(n_tokens) not in lengths:
        return "the pairs of this prompt length have several sweep lengths"
    if not found:
        return "the logit-difference sweep did not patch this cell (patching.positions/components)"
    if not np.isfinite(value):
        return "recovery undefined: clean and corrupted logit differences are equal for every pair"
    return ""
