"""Chain-of-thought jobs: lens / probe trajectories and lead time, the tuned lens's translators,
early answering (rules in workflow/rules/cot.smk)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from layerscope.analysis import lead_time as LT
from layerscope.analysis import trajectories as TR
from layerscope.analysis import tuned_lens as TL
from layerscope.atomic import atomic_path, write_csv
from layerscope.data.cot import OFFSET_COLUMNS, compile_marker, token_offsets
from layerscope.data.datasets import read_prompt_table
from layerscope.engine.loading import load_from_settings
from layerscope.engine.tokens import resolve_bos, tokenize_prompts
from layerscope.errors import LayerscopeError
from layerscope.settings import CotSettings, ModelSettings, PrecisionSettings

PathLike = str | os.PathLike
POSITION_COLUMNS = (
    "prompt_id",
    "label",
    "group",
    "n_tokens",
    "reasoning_start_token",
    "marker_start_token",
    "answer_start_token",
    "answer_token_id",
    "answer_merged",
    "reasoning_start_char",
    "marker_start_char",
    "answer_start_char",
    "answer",
)


def read_cot_table(path: PathLike, dataset: str) -> pd.DataFrame:
    """The prompt table of a chain-of-thought dataset; one without answer offsets is an error."""
    table = read_prompt_table(path)
    missing = [c for c in OFFSET_COLUMNS if c not in table.columns]
    if missing:
        raise LayerscopeError(
            f"dataset {dataset!r} is in cot.datasets but its prompt table {path} has no "
            f"{', '.join(missing)}: its text must hold the response (phase2: text: "
            "question_response; labelled: response_field)"
        )
    return table


def cot_layout(tokenizer, table: pd.DataFrame, bos: bool) -> tuple[pd.DataFrame, list[list[int]]]:
    """positions.csv (token offsets of every prompt under this tokenizer) and the token ids."""
    ids = tokenize_prompts(tokenizer, table["text"].tolist(), prepend_bos=bos)
    rows = []
    for rec, x in zip(table.to_dict("records"), ids):
        chars = [int(rec[c]) for c in OFFSET_COLUMNS[:3]]
        off = token_offsets(tokenizer, rec["text"], x, bos, chars)
        rows.append(
            {
                "prompt_id": rec["prompt_id"],
                "label": rec["label"],
                "group": rec["group"],
                "n_tokens": off.n_tokens,
                "reasoning_start_token": off.reasoning_start,
                "marker_start_token": off.marker_start,
                "answer_start_token": off.answer_start,
                "answer_token_id": off.answer_token,
                "answer_merged": off.answer_merged,
                **{c: rec[c] for c in OFFSET_COLUMNS},
            }
        )
    return pd.DataFrame(rows, columns=list(POSITION_COLUMNS)), ids


def _load(model: ModelSettings, components, device, engine, log):
    """The model (native engine unless it needs the bridge), its tokenizer and the BOS policy."""
    if model.compatibility_mode:
        raise LayerscopeError(
            "cot: the lens reads the model's own final norm, which compatibility_mode folds away; "
            "turn compatibility_mode off for this model"
        )
    m, info = load_from_settings(model, components, engine=engine, device=device, log=log)
    m.eval()
    tok = m.tokenizer
    return m, info, tok, resolve_bos(tok, model.bos)


def _pad_id(tok) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, name, None)
        if v is not None:
            return int(v)
    return 0


def _prompts(positions: pd.DataFrame, ids: Sequence[Sequence[int]]) -> list[TR.Prompt]:
    return [
        TR.Prompt(np.asarray(x, dtype=np.int64), int(a), int(t))
        for x, a, t in zip(ids, positions["answer_start_token"], positions["answer_token_id"])
    ]


def split_groups(groups: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The training groups of the tuned lens: a seeded ``fraction`` of the distinct groups (at
    least one, and at least one held out)."""
    uniq = sorted(set(groups))
    if len(uniq) < 2:
        raise LayerscopeError("tuned lens: needs at least two groups (one to train, one held out)")
    k = min(max(1, int(round(fraction * len(uniq)))), len(uniq) - 1)
    order = np.random.default_rng(seed).permutation(len(uniq))
    return {uniq[i] for i in order[:k]}


def load_probes(probe_files: Sequence[tuple[PathLike, Mapping[str, Any]]]) -> list[TR.ProbeView]:
    """The configured probes: (probe JSON path, its {dataset, layer, component, pooling})."""
    import json

    views = []
    for path, spec in probe_files:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        views.append(TR.probe_view(doc, spec["component"], spec["pooling"], os.fspath(path)))
    return views


def trajectories_job(
    files: Mapping[str, Any],
    outputs: Mapping[str, PathLike],
    *,
    model: ModelSettings,
    cot: CotSettings,
    dataset: str,
    device: str = "auto",
    batch_size: int = 8,
    engine: str = "auto",
    threads: int | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Every lens and probe readout of a chain-of-thought dataset, and the lead times; with the
    tuned lens, its translators are trained first (on the training groups' prompts)."""
    _threads(threads)
    table = read_cot_table(files["table"], dataset)
    probes = load_probes(files.get("probes", []))
    m, info, tok, bos = _load(model, {p.component for p in probes}, device, engine, log)
    n_layers = int(info["n_layers"])
    positions, ids = cot_layout(tok, table, bos)
    prompts = _prompts(positions, ids)
    readout = TR.final_readout(m)
    # 16-bit models: the chunked readout and the model's own pass round differently.
    atol = cot.check_atol if model.dtype == "float32" else max(cot.check_atol, 0.1)
    gap = TR.check_readout(m, prompts[:2], readout, n_layers, atol)
    log(f"logit lens: last layer vs the model's own log-probs, largest gap {gap:.2e}")
    translators, split = {}, {}
    if "tuned" in cot.lens:
        tr, meta = train_tuned_lens(m, positions, prompts, n_layers, cot, batch_size, tok, log)
        TL.save_translators(outputs["tuned_lens"], tr, {"model": model.source, **meta})
        translators["tuned"] = TL.translator_fn(tr, TR.model_device(m))
        split = {pid: "train" for pid in meta["train_prompts"]}
    results = TR.run_readouts(
        m,
        prompts,
        n_layers=n_layers,
        top_k=cot.top_k,
        chunk=cot.chunk,
        translators=translators,
        probes=probes,
        batch_size=batch_size,
        pad_id=_pad_id(tok),
        readout=readout,
    )
    return _write_trajectories(results, positions, probes, outputs, cot, n_layers, split, log)


def _write_trajectories(results, positions, probes, outputs, cot, n_layers, split, log):
    """Write every trajectories table (h5, lens, summaries, lead times) from the readouts."""
    write_positions_h5(outputs["h5"], results, positions, probes)
    write_csv(outputs["positions"], positions)
    lens = TR.lens_table(results, positions, range(n_layers))
    write_csv(outputs["lens"], lens)
    write_csv(outputs["lens_summary"], TR.summarize_lens(lens, cot.bins, 0.95))
    write_csv(outputs["lens_kl"], TR.kl_table(lens, split))
    ptab = TR.probe_table(results, positions, probes)
    write_csv(outputs["probes"], ptab)
    lead = LT.lead_times(lens, positions, ptab)
    write_csv(outputs["lead_time"], lead)
    labels = _label_order(positions["label"])
    summary = LT.summarize_lead(lead, labels, n_boot=cot.n_boot, seed=cot.seed, conf=0.95)
    write_csv(outputs["lead_summary"], summary)
    share = float(lead.loc[lead["readout"] == "logit", "decodable"].mean())
    if share == 0.0:
        log("WARNING no_decodable_answer: the logit lens never has the answer as top token")
    log(f"{len(positions)} prompts, {n_layers} layers; answer decodable at the end: {share:.2f}")
    return {"n_prompts": len(positions), "decodable_share": share}


def _label_order(labels: pd.Series) -> list[str]:
    """Labels in a fixed order: unfaithful before faithful (the difference is faithful minus
    unfaithful), else sorted."""
    uniq = sorted(set(labels))
    if set(uniq) == {"faithful", "unfaithful"}:
        return ["unfaithful", "faithful"]
    return uniq


def write_positions_h5(path: PathLike, results, positions: pd.DataFrame, probes) -> None:
    """lens.h5: every readout as flat arrays over the prompts' positions, ragged by offsets."""
    import h5py

    n_lens = positions["answer_start_token"].to_numpy()
    n_tok = positions["n_tokens"].to_numpy()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("prompt_ids", data=positions["prompt_id"].astype(str).tolist())
        f.create_dataset("labels", data=positions["label"].astype(str).tolist())
        f.create_dataset("lens_offsets", data=np.concatenate([[0], np.cumsum(n_lens)]))
        f.create_dataset("token_offsets", data=np.concatenate([[0], np.cumsum(n_tok)]))
        for c in ("reasoning_start_token", "answer_start_token"):
            f.create_dataset(c, data=positions[c].to_numpy())
        for name in results[0].lens if results else []:
            g = f.create_group(f"lens/{name}")
            for key in results[0].lens[name]:
                g.create_dataset(
                    key, data=np.concatenate([r.lens[name][key] for r in results], axis=1)
                )
        if probes:
            f.create_dataset("probes/scores", data=np.concatenate([r.probes for r in results], 1))
            f["probes"].attrs["names"] = [p.name for p in probes]
        f.attrs["complete"] = True


def _threads(threads: int | None) -> None:
    """Torch's CPU threads = the job's threads (a shared machine is otherwise oversubscribed)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def train_tuned_lens(m, positions, prompts, n_layers, cot, batch_size, tok, log):
    """The tuned lens's translators, trained on the token-level residuals of the training groups'
    prompts (one forward pass over them); returns (translators, meta)."""
    import torch

    s = cot.tuned_lens
    train = split_groups(positions["group"].tolist(), s.train_fraction, cot.seed)
    keep = positions["group"].isin(train).to_numpy()
    chosen = [p for p, k in zip(prompts, keep) if k]
    resid = _token_residuals(m, chosen, n_layers, batch_size, _pad_id(tok), cot, log)
    TR.hf_model(m).requires_grad_(False)
    final = resid.pop(n_layers)
    with torch.enable_grad():
        tr, last = TL.train_translators(
            resid,
            final,
            TR.final_readout(m),
            steps=s.steps,
            lr=s.lr,
            batch_tokens=s.batch_tokens,
            seed=cot.seed,
        )
    meta = {
        "train_prompts": positions.loc[keep, "prompt_id"].tolist(),
        "n_tokens": int(final.shape[0]),
        "settings": s.to_dict(),
        "train_kl": {str(L): v for L, v in last.items()},
    }
    kl = ", ".join(f"{v:.3g}" for v in last.values())
    log(f"tuned lens: {len(chosen)} training prompts, {final.shape[0]} positions; train KL {kl}")
    return tr, meta


def _token_residuals(m, prompts, n_layers, batch_size, pad_id, cot, log) -> dict:
    """``{layer: [N, d]}`` resid_post at the lens positions of ``prompts`` (float32, on the model's
    device, where the translators train), with ``n_layers`` holding the last layer again as the
    target; a seeded sample of ``max_tokens`` positions when there are more."""
    import torch

    keys = {("resid_post", L) for L in range(n_layers)}
    parts: dict[int, list] = {L: [] for L in range(n_layers)}
    for batch, cap in capture(m, prompts, keys, batch_size, pad_id):
        for row, i in enumerate(batch):
            n = prompts[i].n_lens
            for L in range(n_layers):
                parts[L].append(cap[("resid_post", L)][row, :n].float())
    out = {L: torch.cat(v) for L, v in parts.items()}
    N = out[0].shape[0]
    if N > cot.tuned_lens.max_tokens:
        g = torch.Generator().manual_seed(cot.seed)
        idx = torch.randperm(N, generator=g)[: cot.tuned_lens.max_tokens].to(out[0].device)
        out = {L: v[idx] for L, v in out.items()}
        log(f"tuned lens: {cot.tuned_lens.max_tokens} of {N} positions sampled")
    out[n_layers] = out[n_layers - 1]
    return out


def capture(m, prompts, keys, batch_size, pad_id):
    """:func:`layerscope.analysis.trajectories.capture_batches` with this job's batching."""
    return TR.capture_batches(m, prompts, keys, batch_size=batch_size, pad_id=pad_id)


def early_answering_job(
    table_path: PathLike,
    outputs: Mapping[str, PathLike],
    *,
    model: ModelSettings,
    cot: CotSettings,
    precision: PrecisionSettings,
    dataset: str,
    marker: str,
    device: str = "auto",
    batch_size: int = 32,
    engine: str = "auto",
    threads: int | None = None,
    log: Callable[[str], Any] = print,
) -> pd.DataFrame:
    """early_answering.csv and its summary for one chain-of-thought dataset."""
    _threads(threads)
    from layerscope.interventions import early_answering as EA
    from layerscope.interventions.generation import stepper_for

    table = read_cot_table(table_path, dataset)
    m, _, tok, bos = _load(model, [], device, engine, log)
    positions, ids = cot_layout(tok, table, bos)
    prompts = [
        EA.CotPrompt(
            str(r.prompt_id),
            str(r.label),
            tuple(int(t) for t in x),
            int(r.reasoning_start_token),
            int(r.marker_start_token),
            int(r.answer_start_token),
        )
        for r, x in zip(positions.itertuples(index=False), ids)
    ]
    s = cot.early_answering
    filler = tokenize_prompts(tok, [s.filler], prepend_bos=False)[0]
    rows = EA.early_answering(
        stepper_for(m),
        tok,
        prompts,
        fractions=s.fractions,
        filler_ids=filler,
        marker=compile_marker(marker, f"datasets.{dataset}.answer_marker"),
        max_new_tokens=s.max_new_tokens,
        batch_size=batch_size,
        answer_regex=s.answer_regex,
        log=log,
    )
    if (rows["answer"] == "").all():
        raise LayerscopeError(
            "early answering: every generated answer is empty (the model writes no answer after "
            f"the marker {marker!r}); check answer_marker and answer_regex"
        )
    summary = EA.summarize_early(rows, precision)
    write_csv(outputs["rows"], rows)
    write_csv(outputs["summary"], summary)
    _log_early(summary, log)
    return summary


def _log_early(summary: pd.DataFrame, log) -> None:
    for r in summary[summary["fraction"].isin([0.0, 1.0])].itertuples(index=False):
        log(
            f"fraction {r.fraction:g} {r.condition} {r.label}: {r.n_match}/{r.n} = {r.rate:.2f} "
            f"[{r.ci_low:.2f}, {r.ci_high:.2f}] {r.warning}"
        )


def marker_of(spec: Mapping[str, Any], cot: CotSettings) -> str:
    """The answer marker of a dataset: its own, else ``cot.answer_marker``."""
    return str(spec.get("answer_marker") or cot.answer_marker)
