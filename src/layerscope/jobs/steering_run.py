"""Steering jobs: files in (prompts, neutral prompts, direction sources, model), tables out.

The numerical work is :mod:`layerscope.interventions.steering`; this module reads its inputs (with
errors that name file, line/row and field), runs the sweep, and writes every table atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from layerscope.atomic import write_csv, write_json
from layerscope.errors import InputError, LayerscopeError
from layerscope.interventions import steering as S
from layerscope.settings import ModelSettings, PrecisionSettings

PathLike = str | os.PathLike
PROMPT_COLUMNS = ("prompt_id", "prompt")
TARGET_COLUMNS = ("positive", "negative")


# --------------------------------------------------------------------------------------------
# prompts


def _records(path: PathLike) -> tuple[list[str], list[Any], str]:
    from layerscope.data.datasets import read_records

    return read_records(path)


def load_prompts(path: PathLike, targets: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Steering prompts: ``prompt_id, prompt`` plus per-prompt ``positive, negative`` answer
    strings.

    ``targets`` (``{"positive": " true", "negative": " false"}``) gives the same two answers to
    every prompt instead; then the file must not have those columns (one source of truth). Values
    are kept exactly as written (leading spaces matter for answers).
    """
    from layerscope.data.datasets import scalar_str as _scalar_str

    columns, records, shown = _records(path)
    need = list(PROMPT_COLUMNS) + ([] if targets else list(TARGET_COLUMNS))
    for col in need:
        if col not in columns:
            hint = " (or give the experiment's targets)" if col in TARGET_COLUMNS else ""
            raise InputError(
                f"required column is missing{hint}; columns found: {columns}", file=shown, field=col
            )
    if targets and any(c in columns for c in TARGET_COLUMNS):
        raise InputError(
            "the file has answer columns and the experiment gives targets; keep one of them",
            file=shown,
            field="positive",
        )
    rows, seen = [], {}
    for rec in records:
        row = {}
        for col in need:
            value = _scalar_str(rec.values.get(col))
            if value is None or value.strip() == "":
                raise InputError("value is empty or missing", file=shown, line=rec.line, field=col)
            row[col] = value
        if row["prompt_id"] in seen:
            first = seen[row["prompt_id"]]
            raise InputError(
                f"duplicate prompt_id {row['prompt_id']!r} (first on line {first})",
                file=shown,
                line=rec.line,
                field="prompt_id",
            )
        seen[row["prompt_id"]] = rec.line
        if targets:
            row.update(positive=targets["positive"], negative=targets["negative"])
        if row["positive"] == row["negative"]:
            raise InputError(
                "the positive and negative answers are identical",
                file=shown,
                line=rec.line,
                field="negative",
            )
        rows.append(row)
    if not rows:
        raise InputError("no prompts", file=shown)
    df = pd.DataFrame(rows, columns=list(PROMPT_COLUMNS) + list(TARGET_COLUMNS))
    df.attrs["source"] = shown
    return df


def dataset_prompts(table_csv: PathLike, targets: Mapping[str, str]) -> pd.DataFrame:
    """Prompts from a prepared dataset table (``prompt_id, text``) with fixed target answers."""
    table = pd.read_csv(table_csv, dtype=str, keep_default_na=False)
    df = pd.DataFrame(
        dict(
            prompt_id=table["prompt_id"],
            prompt=table["text"],
            positive=targets["positive"],
            negative=targets["negative"],
        )
    )
    df.attrs["source"] = os.fspath(table_csv)
    return df


def load_neutral(path: PathLike) -> list[str]:
    """Neutral prompts: a text file, one prompt per line (blank lines and lines starting with #
    skipped)."""
    shown = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("file not found", file=shown) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=shown) from None
    lines = [ln.strip() for ln in text.splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise InputError("no neutral prompts (one per line expected)", file=shown)
    return out


# --------------------------------------------------------------------------------------------
# directions


def _probe_doc(path: PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg})", file=path, line=exc.lineno) from None


def _read_array_file(path: PathLike, layers: Sequence[int]) -> dict[int, np.ndarray] | np.ndarray:
    """A user direction file: ``.npy`` ([d] or [n_layers, d]) or HDF5 (``layer_{L}`` datasets, or
    one array ``directions``)."""
    shown = os.fspath(path)
    if not Path(path).exists():
        raise InputError("file not found", file=shown)
    if shown.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(f"not a readable .npy array ({exc})", file=shown) from None
    if not shown.endswith((".h5", ".hdf5")):
        raise InputError("unknown direction file type; expected .npy, .h5 or .hdf5", file=shown)
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "directions" in f:
                return f["directions"][()]
            missing = [f"layer_{L}" for L in layers if f"layer_{L}" not in f]
            if missing:
                raise InputError(
                    f"no dataset {missing[0]!r} (expected one vector per layer named "
                    f"layer_{{L}}, or one array 'directions'); found {sorted(f.keys())}",
                    file=shown,
                    field=missing[0],
                )
            return {int(L): f[f"layer_{L}"][()] for L in layers}
    except OSError as exc:
        raise InputError(f"not a readable HDF5 file ({exc})", file=shown) from None


def file_directions(
    path: PathLike, layers: Sequence[int], n_layers: int, d_model: int
) -> dict[int, np.ndarray]:
    """Unit directions per layer from a user file; errors name the file and the field."""
    arr = _read_array_file(path, layers)
    out = {}
    for L in layers:
        field = f"layer_{L}" if isinstance(arr, dict) else "array"
        try:
            out[L] = S.file_direction(
                arr[L] if isinstance(arr, dict) else arr,
                L,
                n_layers,
                d_model,
                what="vector" if isinstance(arr, dict) else "array",
            )
        except S.SteeringError as exc:
            raise InputError(str(exc), file=path, field=field) from None
    return out


def load_directions(
    spec: Mapping[str, Any],
    files: Mapping[str, Any],
    layers: Sequence[int],
    *,
    n_layers: int,
    d_model: int,
) -> dict[int, np.ndarray]:
    """Unit directions per layer from the configured source (probe, mass_mean, task_vector or file).

    ``files``: ``probes`` (layer -> probe JSON), ``layers`` (layer -> layer_{L}.h5), ``summary``
    (dataset summary.json), ``task_vectors`` (matrices.h5) or ``path`` (the user file).
    """
    src = spec["source"]
    if src == "probe":
        comp, pool = spec["component"], spec["pooling"]
        return {
            L: _wrap(
                files["probes"][L],
                lambda p: S.probe_direction(_probe_doc(p), comp, pool, os.fspath(p)),
            )
            for L in layers
        }
    if src == "mass_mean":
        from layerscope.data.h5cache import read_layer
        from layerscope.jobs.probe_runs import positive_class

        positive = positive_class(files["summary"])
        if positive is None:
            raise InputError(
                "the dataset has no positive class; mass-mean needs a binary label",
                file=files["summary"],
                field="positive_class",
            )
        out = {}
        for L in layers:
            data = read_layer(files["layers"][L], spec["component"], spec["pooling"])
            out[L] = _wrap(
                files["layers"][L],
                lambda p, data=data: S.mass_mean_direction(
                    data.X, data.labels, positive, os.fspath(p)
                ),
            )
        return out
    if src == "task_vector":
        from layerscope.analysis.task_vectors import read_task_vectors

        arrays = read_task_vectors(files["task_vectors"])
        path, task = files["task_vectors"], spec["task"]
        return {
            L: _wrap(path, lambda p, L=L: S.task_vector_direction(arrays, L, task, os.fspath(p)))
            for L in layers
        }
    if src == "file":
        return file_directions(files["path"], layers, n_layers, d_model)
    raise LayerscopeError(f"unknown direction source {src!r}")


def points_towards(spec: Mapping[str, Any], files: Mapping[str, Any]) -> str:
    """What alpha > 0 pushes towards: the positive class of a probe or mass-mean direction (the
    probe's ``classes[1]``, the dataset's ``positive_class``), the task of a task vector, or the
    user file's own sign."""
    src = spec["source"]
    if src == "probe":
        first = files["probes"][min(files["probes"])]
        for probe in _probe_doc(first).get("probes", []):
            if (probe.get("component"), probe.get("pooling")) == (
                spec["component"],
                spec["pooling"],
            ):
                classes = (probe.get("result") or {}).get("classes") or [None, None]
                return f"class {classes[-1]!r} of dataset {spec['dataset']!r}"
    if src == "mass_mean":
        from layerscope.jobs.probe_runs import positive_class

        return f"class {positive_class(files['summary'])!r} of dataset {spec['dataset']!r}"
    if src == "task_vector":
        return f"task {spec['task']!r} of dataset {spec['dataset']!r}"
    return "the direction as stored in the file (its sign is the user's)"


def _wrap(path, fn: Callable):
    try:
        return fn(path)
    except S.SteeringError as exc:
        raise InputError(str(exc).removeprefix(f"{os.fspath(path)}: "), file=path) from None


# --------------------------------------------------------------------------------------------
# the job


def steering_experiment(
    files: Mapping[str, Any],
    out: Mapping[str, PathLike],
    *,
    model: ModelSettings | Mapping[str, Any],
    experiment: Mapping[str, Any],
    precision: PrecisionSettings | Mapping[str, Any],
    device: str,
    batch_size: int,
    threads: int | None,
    engine: str = "auto",
    name: str = "<name>",
    log=print,
) -> dict[str, Any]:
    """Load the model, build the prompts and directions, run the sweep, write every table.
    ``name``: the experiment's key under steering.experiments (named in refusals and warnings).
    ``model``, ``precision``: typed settings, or mappings completed from the schema's defaults."""
    import torch

    from layerscope.engine.loading import load_from_settings
    from layerscope.engine.tokens import resolve_bos

    model, precision = ModelSettings.of(model), PrecisionSettings.of(precision)
    t0 = time.perf_counter()
    if threads and device in ("cpu", "auto"):
        torch.set_num_threads(int(threads))
    targets = experiment.get("targets")
    if "dataset" in experiment:
        prompts = dataset_prompts(files["prompts"], targets)
    else:
        prompts = load_prompts(files["prompts"], targets)
    neutral = load_neutral(files["neutral"])
    # The native engine (plain HF model, hooks on its modules) or the bridge: the same hooks
    # contract.
    bridge, info = load_from_settings(
        model, [experiment["hook"]], engine=engine, device=device, log=log
    )
    log(f"engine: {info.get('engine', 'bridge')}")
    layers = list(experiment["layers"])
    spec = experiment["direction"]
    directions = load_directions(
        spec, files, layers, n_layers=info["n_layers"], d_model=info["d_model"]
    )
    prepend = resolve_bos(bridge.tokenizer, model.bos)
    sp = S.prepare_prompts(bridge.tokenizer, prompts, neutral, prepend_bos=prepend)
    warnings = setup_warnings(sp, experiment, name)
    for w in warnings:
        log(f"WARNING {w}")
    t1 = time.perf_counter()
    res = S.steering_sweep(
        bridge,
        sp,
        directions,
        alphas=experiment["alphas"],
        component=experiment["hook"],
        position=experiment["positions"],
        source=spec["source"],
        n_random=experiment["n_random"],
        seed=experiment["seed"],
        precision=precision,
        batch_size=batch_size,
        log=log,
    )
    gens = generations(bridge, sp, prompts, directions, res, experiment, batch_size)
    wall = time.perf_counter() - t0
    write_csv(out["effects"], res.effects)
    write_csv(out["per_prompt"], res.per_prompt)
    write_csv(out["norms"], res.norms)
    write_csv(out["generations"], gens)
    # Timings go to the log (and the benchmark file), not into summary.json: reruns give identical
    # bytes.
    log(f"sweep {time.perf_counter() - t1:.1f} s, whole job {wall:.1f} s")
    summary = dict(
        res.info,
        model=info,
        experiment=dict(experiment),
        precision=precision.to_dict(),
        headline=headline(res.effects),
        notes=res.notes,
        warnings=warnings,
        points_towards=points_towards(spec, files),
    )
    write_json(out["summary"], summary)
    return summary


def setup_warnings(sp: S.SteeringPrompts, experiment: Mapping[str, Any], name: str) -> list[str]:
    """Named warnings about what the setup makes of the results, checked before the sweep.

    Refuses (InputError) a ``positions`` past the end of every prompt: every effect would be exactly
    0 by construction. Warns when it is past some prompts (those effects are 0), and when an answer
    has tokens after the first one where the two answers differ (only that token is compared)."""
    key, pos = f"steering.experiments.{name}", experiment["positions"]
    lengths = np.asarray([len(r) for r in sp.ids])
    idle = S.row_starts(lengths, pos) >= lengths
    idle_neutral = S.row_starts([len(r) for r in sp.neutral_ids], pos) >= [
        len(r) for r in sp.neutral_ids
    ]
    if idle.all() or idle_neutral.all():
        what = "prompt" if idle.all() else "neutral prompt"
        longest = max(lengths) if idle.all() else max(len(r) for r in sp.neutral_ids)
        raise InputError(
            f"positions {pos} is past the end of every {what} (the longest has {longest} tokens), "
            f"so every effect would be exactly 0; set {key}.positions to a smaller or negative "
            "(from the end) position, or 'all'",
            field="positions",
        )
    out = []
    if idle.any():
        first = int(np.flatnonzero(idle)[0])
        out.append(
            f"positions_past_prompt: positions {pos} is past the end of {int(idle.sum())} of "
            f"{len(idle)} prompts (first: {sp.prompt_ids[first]}, {lengths[first]} tokens), whose "
            f"effects are 0 by construction; set {key}.positions"
        )
    if sp.multi_token:
        out.append(
            f"targets_multi_token: in {len(sp.multi_token)} of {len(idle)} prompts (first: "
            f"{sp.multi_token[0]}) an answer has tokens after the first token where the positive "
            "and negative answers differ; only that token is compared, the rest is not scored "
            f"(if the rest matters, set {key}.targets, or the prompts file's positive/negative, "
            "to answers whose first differing token decides them)"
        )
    return out


def generations(
    bridge,
    sp: S.SteeringPrompts,
    prompts: pd.DataFrame,
    directions,
    res: S.SteeringResult,
    experiment: Mapping[str, Any],
    batch_size: int,
) -> pd.DataFrame:
    """Greedy continuations along the direction for every (layer, alpha), when ``max_new_tokens`` >
    0."""
    import torch

    k = int(experiment.get("max_new_tokens", 0))
    cols = [
        "layer",
        "alpha",
        "prompt_id",
        "text",
        "starts_with_positive",
        "starts_with_negative",
        "kv_cache",
    ]
    if k < 1:
        return pd.DataFrame(columns=cols)
    scale = dict(zip(res.norms["layer"], res.norms["scale"]))
    rows = []
    for L in res.info["layers"]:
        u = S.unit(directions[L])
        for a in res.info["alphas"]:
            vec = torch.as_tensor(a * scale[L] * u, dtype=torch.float64)
            toks, cached = S.generate(
                bridge,
                sp.ids,
                k,
                hook=S.hook_name(experiment["hook"], L),
                vector=vec,
                position=experiment["positions"],
                batch_size=batch_size,
                first=int(sp.prepend_bos),
            )
            for pid, t, pos, neg in zip(
                prompts["prompt_id"], toks, prompts["positive"], prompts["negative"]
            ):
                text = bridge.tokenizer.decode(t)
                rows.append(
                    dict(
                        layer=L,
                        alpha=a,
                        prompt_id=pid,
                        text=text,
                        kv_cache=cached,
                        starts_with_positive=_starts(text, pos),
                        starts_with_negative=_starts(text, neg),
                    )
                )
    return pd.DataFrame(rows, columns=cols)


def _starts(text: str, answer: str) -> bool:
    """Whether the generated text (new tokens only; the shared answer prefix is whitespace in the
    demo) starts with ``answer``, both stripped of surrounding whitespace."""
    return text.strip().startswith(answer.strip())


def headline(effects: pd.DataFrame) -> list[dict[str, Any]]:
    """Per metric: the (layer, alpha) of the direction's largest |value|, and whether it leaves the
    random band."""
    main = effects[(effects["source"] != "random") & (effects["alpha"] != 0)]
    out = []
    for m, g in main.groupby("metric", sort=True):
        r = g.loc[g["value"].abs().idxmax()]
        out.append(
            dict(
                metric=m,
                layer=int(r["layer"]),
                alpha=float(r["alpha"]),
                value=float(r["value"]),
                ci_low=float(r["ci_low"]),
                ci_high=float(r["ci_high"]),
                n=int(r["n"]),
                beyond_random=bool(r["beyond_random"]),
                n_for_half_width=r["n_for_half_width"],
                n_for_power=r["n_for_power"],
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# config: resolve an experiment for one model (used by workflow/rules/steering.smk at parse time)


def resolve_experiment(
    config: Mapping[str, Any],
    name: str,
    model: str,
    layers_of: Mapping[str, Sequence[int]],
    n_layers_of: Mapping[str, int],
) -> dict[str, Any]:
    """The experiment's settings for ``model``, defaults filled, layers resolved; ConfigError if
    invalid."""
    from layerscope.errors import ConfigError

    exp = dict(config["steering"]["experiments"][name])
    key = f"steering.experiments.{name}"
    datasets = config["datasets"]
    if ("prompts" in exp) == ("dataset" in exp):
        raise ConfigError(
            key, "give exactly one of 'prompts' (a file) and 'dataset' (a configured dataset)"
        )
    if "dataset" in exp:
        if exp["dataset"] not in datasets:
            raise ConfigError(f"{key}.dataset", f"{exp['dataset']!r} is not a configured dataset")
        if "targets" not in exp:
            raise ConfigError(
                f"{key}.targets", "prompts from a dataset need targets {positive, negative}"
            )
    d = dict(exp["direction"])
    act = config["activations"]
    configured = list(layers_of[model])
    if d["source"] in ("probe", "mass_mean", "task_vector"):
        if d.get("dataset") not in datasets:
            raise ConfigError(
                f"{key}.direction.dataset",
                f"{d.get('dataset')!r} is not a configured dataset "
                f"(the {d['source']} source needs one)",
            )
    if d["source"] in ("probe", "mass_mean"):
        d.setdefault("component", act["components"][0])
        d.setdefault("pooling", act["poolings"][0])
        for k, have in (("component", act["components"]), ("pooling", act["poolings"])):
            if d[k] not in have:
                raise ConfigError(
                    f"{key}.direction.{k}", f"{d[k]!r} is not cached (activations.{k}s: {have})"
                )
    elif d["source"] == "task_vector":
        spec = datasets[d["dataset"]]
        if spec.get("kind") != "task_grid":
            raise ConfigError(
                f"{key}.direction.dataset", f"{d['dataset']!r} is not a task_grid dataset"
            )
        if d.get("task") not in spec.get("tasks", []):
            raise ConfigError(
                f"{key}.direction.task", f"{d.get('task')!r} is not one of {spec.get('tasks')}"
            )
    elif not d.get("path"):
        raise ConfigError(f"{key}.direction.path", "the file source needs a path")
    every = list(range(int(n_layers_of[model])))
    allowed = every if d["source"] == "file" else configured
    layers = allowed if exp["layers"] == "all" else sorted(set(int(L) for L in exp["layers"]))
    bad = [L for L in layers if L not in allowed]
    if bad:
        what = (
            "layers of the model"
            if d["source"] == "file"
            else "configured layers (models.*.layers) of the model"
        )
        raise ConfigError(f"{key}.layers", f"{bad} are not {what} {model!r}: {allowed}")
    exp.update(direction=d, layers=layers)
    return exp


def d_model_of(config: Mapping[str, Any], model: str) -> int | None:
    """The residual width of a local model (its config.json), None for a hub id."""
    from layerscope.config import read_d_model

    source = config.get("models", {}).get(model, {}).get("source")
    return read_d_model(source) if source else None


def check_experiment_files(
    exp: Mapping[str, Any], key: str, n_layers: int, d_model: int | None
) -> None:
    """Read every file the experiment names, as the job will, so a missing or malformed one stops
    the dry run (Snakemake keeps an existing output whose input is missing, so a job-time check
    would never run). ConfigError names the key; its reason names the file, line and field."""
    from layerscope.errors import ConfigError

    targets = exp.get("targets")
    if targets and targets.get("positive") == targets.get("negative"):
        raise ConfigError(
            f"{key}.targets", f"positive and negative are identical ({targets.get('positive')!r})"
        )
    d = exp["direction"]
    checks = [("neutral", lambda: load_neutral(exp["neutral"]))]
    if "prompts" in exp:
        checks.append(("prompts", lambda: load_prompts(exp["prompts"], targets)))
    if d["source"] == "file":
        checks.append(
            ("direction.path", lambda: _check_direction_file(d["path"], exp, n_layers, d_model))
        )
    for sub, check in checks:
        try:
            check()
        except LayerscopeError as exc:
            raise ConfigError(f"{key}.{sub}", str(exc)) from None


def _check_direction_file(path: PathLike, exp, n_layers: int, d_model: int | None) -> None:
    """Shape and finiteness of a user direction file (the width only when the model is local)."""
    if d_model is not None:
        file_directions(path, exp["layers"], n_layers, d_model)
        return
    arr = _read_array_file(path, exp["layers"])
    for L, a in arr.items() if isinstance(arr, dict) else [("array", arr)]:
        try:
            S.unit(a, f"layer {L}" if isinstance(arr, dict) else "array")
        except S.SteeringError as exc:
            raise InputError(str(exc), file=path) from None


def experiment_inputs(exp: Mapping[str, Any], model: str) -> dict[str, Any]:
    """Input files of one steering job (so Snakemake orders it after probes / caching / task
    vectors)."""
    d = exp["direction"]
    files: dict[str, Any] = {"neutral": exp["neutral"]}
    table = f"results/datasets/{exp.get('dataset')}/prompts.csv"
    files["prompts"] = table if "dataset" in exp else exp["prompts"]
    ds = d.get("dataset")
    if d["source"] == "probe":
        files["probes"] = [f"results/probes/{model}/{ds}/layer_{L}.json" for L in exp["layers"]]
    elif d["source"] == "mass_mean":
        files["layers"] = [f"results/activations/{model}/{ds}/layer_{L}.h5" for L in exp["layers"]]
        files["summary"] = f"results/datasets/{ds}/summary.json"
    elif d["source"] == "task_vector":
        files["task_vectors"] = f"results/task_vectors/{model}/{ds}/matrices.h5"
    else:
        files["path"] = d["path"]
    return files


def by_layer(paths: Sequence[PathLike], layers: Sequence[int]) -> dict[int, PathLike]:
    """Per-layer input paths (in ``layers`` order, as :func:`experiment_inputs` lists them) by
    layer."""
    if len(paths) != len(layers):
        raise LayerscopeError(f"{len(paths)} per-layer files for {len(layers)} layers")
    return dict(zip([int(L) for L in layers], paths))
