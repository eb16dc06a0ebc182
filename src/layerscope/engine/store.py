"""Cache pooled per-layer activations with one batched forward pass per (model, dataset).

``cache_store`` runs every prompt through the model (native engine or TransformerBridge, see
:mod:`layerscope.engine.loading`) once and writes the pooled vectors of EVERY layer (for the
configured components and poolings) to a *store*; ``extract_layer`` then cuts one layer out of it
into ``layer_{L}.h5``. Layout: see :mod:`layerscope.data.h5cache`.

How prompts go through the model (all decided here, not left to the bridge):

* Tokens, the BOS policy and the batch plan come from :mod:`layerscope.engine.tokens`.
* Batches are padded on the RIGHT; the model gets ``input_ids`` and an explicit
  ``attention_mask`` (padding is never inferred from token ids: GPT-2's pad id is its BOS id).
  With right padding every real token keeps positions ``0..n-1`` and, the attention being
  causal, never sees a pad, so batched results equal one-prompt-at-a-time results up to float
  rounding.
* Pooling uses the attention mask (minus the BOS position when ``exclude_bos_from_pooling``).
* Hooks sit only on the needed hook points; the hook on the last needed one raises
  ``StopAtLayerException``, so the final norm and the full-vocabulary LM head never run.
* The parity self-check (:mod:`layerscope.engine.parity`) recomputes a few prompts with plain
  ``transformers`` before the file is renamed into place.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerscope import __version__ as LAYERSCOPE_VERSION
from layerscope.atomic import atomic_path
from layerscope.data import h5cache
from layerscope.data.datasets import read_texts_table
from layerscope.engine import diskspace, parity
from layerscope.engine.loading import (
    HOOKS,
    describe_model,
    hook_name,
    load_from_settings,
    model_device,
    tl_version,
)
from layerscope.engine.tokens import (
    batches_over_cap,
    make_batches,
    resolve_bos,
    shard_batches,
    token_arrays,
)
from layerscope.errors import LayerscopeError, name_list
from layerscope.settings import ActivationSettings, ModelSettings

#: order in which the hooks of one block fire (the last one needed is where we stop).
_FIRE_ORDER = {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_out": 3, "resid_post": 4}
_OUT_DTYPES = ("float32", "float16", "float64")


def _stop_exception(model) -> type:
    """The exception a hook raises to end a forward pass early, as the model catches it."""
    exc = getattr(model, "stop_exception", None)
    if exc is None:
        from transformer_lens.model_bridge.exceptions import StopAtLayerException as exc
    return exc


def _check_choices(values: Iterable[str], allowed: Sequence[str], what: str) -> list[str]:
    """``values`` as a list; raise on a value not in ``allowed`` or a repeated one."""
    values = list(values)
    bad = [v for v in values if v not in allowed]
    if bad:
        extra = (
            " (token-level vectors come from token_level_layers)"
            if what == "pooling" and "none" in bad
            else ""
        )
        raise LayerscopeError(f"unknown {what}(s) {bad}; expected some of {list(allowed)}{extra}")
    if len(set(values)) != len(values):
        raise LayerscopeError(f"duplicate {what}s in {values}")
    return values


@dataclass(frozen=True)
class CacheRequest:
    """What :func:`cache_store` was asked to cache, validated (the settings, not the prompts)."""

    components: list[str]
    poolings: list[str]
    token_level_layers: list[int]
    bos_policy: bool | str
    exclude_bos_from_pooling: bool
    batch_size: int
    max_tokens_per_batch: int | None
    dtype_out: str
    compression: str | int | None
    progress_every_s: float
    stop_early: bool
    shard: tuple[int, int] | None
    self_check: int  # as given: 0 (or None) = off


@dataclass(frozen=True)
class CachePlan:
    """The prompts one job computes (its shard's, in table order), their tokens and batches."""

    prompt_ids: list[str]
    texts: list[Any]
    labels: list[str]
    groups: Sequence[Any] | None
    ids: list[Any]  # token ids (int64 arrays), BOS included
    lengths: list[int]
    n_pooled: list[int]
    offsets: np.ndarray  # token-level rows of prompt i: offsets[i]:offsets[i + 1]
    batches: list[list[int]]
    rows: list[int] | None  # a shard's table rows; None unsharded
    n_total: int  # prompts in the whole table
    check_rows: list[int]
    check_pids: list[str]
    prepend: bool
    skip: int  # leading positions left out of pooling (the BOS)
    pad_id: int
    info: dict[str, Any]
    n_layers: int
    d_model: int

    @property
    def n(self) -> int:
        """Prompts this job computes."""
        return len(self.prompt_ids)


@dataclass(frozen=True)
class _CacheRun:
    """Everything the batch loop needs: the model, its hooks and the open store's datasets."""

    bridge: Any
    req: CacheRequest
    plan: CachePlan
    state: dict[str, Any]  # the current batch's masks, and what its hooks captured
    fwd_hooks: list[tuple[str, Callable]]
    device: Any
    pooled_ds: dict[tuple[str, str], Any]
    token_ds: dict[str, Any]
    overflow_hint: str
    log: Callable[[str], Any]


def cache_store(
    bridge,
    prompt_ids: Sequence[str],
    texts: Sequence[str],
    labels: Sequence[Any],
    out_path: str | os.PathLike,
    *,
    components: Sequence[str] | None = None,
    poolings: Sequence[str] | None = None,
    prepend_bos: bool | str | None = None,
    exclude_bos_from_pooling: bool | None = None,
    token_level_layers: Sequence[int] | None = None,
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    log: Callable[[str], Any] | None = print,
    dtype_out: str | None = None,
    compression: str | int | None = None,
    model_info: Mapping[str, Any] | None = None,
    groups: Sequence[Any] | None = None,
    progress_every_s: float = 10.0,
    stop_early: bool = True,
    shard: tuple[int, int] | None = None,
    self_check: int | None = None,
) -> dict[str, Any]:
    """Run all prompts through ``bridge`` once; write pooled vectors of every layer to ``out_path``.

    ``prompt_ids`` / ``texts`` / ``labels`` (and optional ``groups``) are parallel sequences in
    prompt-table order; the store keeps that order. ``prepend_bos`` is the BOS policy
    (``"auto"``, True or False, see :func:`resolve_bos`). Pooling ``mean`` / ``max`` / ``last``
    run over the real tokens (the BOS position left out when ``exclude_bos_from_pooling``);
    every pooled token of the layers in ``token_level_layers`` is also kept (pooling ``none``).
    The file is written incrementally and renamed into place only when complete.
    ``stop_early=False`` lets the forward pass run on through the final norm and LM head (same
    numbers, slower; only there to measure what stopping saves).
    ``shard=(i, n)`` computes only shard ``i`` of ``n`` (see :func:`shard_batches`) and writes a
    *shard* file holding just its prompts; :func:`layerscope.data.h5cache.gather_shards` joins the
    shards into a store equal, array for array, to the unsharded one.
    ``self_check``: how many prompts (the longest, the shortest, ...) the parity self-check
    recomputes with plain ``transformers`` before the file is renamed into place (0 = off; see
    :mod:`layerscope.engine.parity`); the largest difference goes into the attributes and the log.
    A setting left None takes the config schema's default (``activations`` and ``models`` sections).
    Returns a small summary dict (n_prompts, n_tokens, seconds, tokens_per_s, batches).
    """
    stop_exc = _stop_exception(bridge)
    log = log or (lambda msg: None)
    req = _validate_request(
        **_schema_defaults(
            components=components,
            poolings=poolings,
            token_level_layers=token_level_layers,
            dtype_out=dtype_out,
            compression=compression,
            bos_policy=prepend_bos,
            exclude_bos_from_pooling=exclude_bos_from_pooling,
            batch_size=batch_size,
            max_tokens_per_batch=max_tokens_per_batch,
            progress_every_s=progress_every_s,
            stop_early=stop_early,
            shard=shard,
            self_check=self_check,
        )
    )
    prompts = _checked_prompts(prompt_ids, texts, labels, groups)
    info, n_layers, d_model = _checked_model(bridge, req, model_info)
    plan = _plan(bridge, req, prompts, info, n_layers, d_model)
    state: dict[str, Any] = {}
    fwd_hooks = _make_hooks(req, plan, state, stop_exc)
    attrs = _store_attrs(bridge, req, plan)
    device = model_device(bridge)
    _log_plan(req, plan, device, log)
    _check_disk_space(req, plan, out_path)
    t0 = time.perf_counter()
    with atomic_path(out_path) as tmp:
        with h5cache.open_for_write(tmp) as f:
            pooled_ds, token_ds = _create_store(f, req, plan, attrs)
            hint = _overflow_hint(attrs["dtype"], req.dtype_out)
            run = _CacheRun(
                bridge, req, plan, state, fwd_hooks, device, pooled_ds, token_ds, hint, log
            )
            _run_batches(run, t0)
            _finish_store(run, f, attrs)
    return _summary(plan, time.perf_counter() - t0)


def _finish_store(run: _CacheRun, f, attrs: Mapping[str, Any]) -> None:
    """Run the parity self-check on the written values (if asked) and mark ``f`` complete."""
    req, plan = run.req, run.plan
    if req.self_check:
        h5cache.set_attrs(
            f,
            parity.self_check(
                run.bridge,
                f,
                plan.ids,
                plan.check_rows,
                plan.check_pids,
                plan.prompt_ids,
                int(req.self_check),
                plan.skip,
                req.components,
                req.poolings,
                attrs,
                run.log,
            ),
        )
    h5cache.mark_complete(f)


def _summary(plan: CachePlan, seconds: float) -> dict[str, Any]:
    """What :func:`cache_store` returns: prompts, tokens, batches, time and the BOS decision."""
    total_real = int(sum(plan.lengths))
    return {
        "n_prompts": plan.n,
        "n_tokens": total_real,
        "n_batches": len(plan.batches),
        "seconds": seconds,
        "tokens_per_s": total_real / max(seconds, 1e-9),
        "prepend_bos": plan.prepend,
    }


def _schema_defaults(**given: Any) -> dict[str, Any]:
    """``given`` with each setting left None replaced by the config schema's default for it."""
    act, model = ActivationSettings.of({}), ModelSettings.of({"source": "-"})
    defaults = {
        "components": act.components,
        "poolings": act.poolings,
        "token_level_layers": act.token_level_layers,
        "dtype_out": act.out_dtype,
        "exclude_bos_from_pooling": act.exclude_bos_from_pooling,
        "bos_policy": model.bos,
        "batch_size": model.batch_size,
        "self_check": model.self_check,
    }
    return {k: defaults[k] if v is None and k in defaults else v for k, v in given.items()}


def _validate_request(
    components, poolings, token_level_layers, dtype_out, compression, **rest
) -> CacheRequest:
    """Check the components, poolings, token-level layers, output dtype and compression."""
    components = _check_choices(components, h5cache.COMPONENTS, "component")
    poolings = _check_choices(poolings, h5cache.POOLINGS, "pooling")
    if not components:
        raise LayerscopeError("no components to cache")
    token_level_layers = sorted({int(x) for x in token_level_layers})
    if not poolings and not token_level_layers:
        raise LayerscopeError("nothing to cache: no poolings and no token_level_layers")
    if dtype_out not in _OUT_DTYPES:
        raise LayerscopeError(
            f"dtype_out {dtype_out!r} not supported; expected one of {list(_OUT_DTYPES)}"
        )
    h5cache.compression_kwargs(compression)  # validate early
    return CacheRequest(
        components=components,
        poolings=poolings,
        token_level_layers=token_level_layers,
        dtype_out=dtype_out,
        compression=compression,
        **rest,
    )


def _checked_prompts(prompt_ids, texts, labels, groups) -> tuple[list, list, list, Any]:
    """``(prompt_ids, texts, labels, groups)`` as lists of one length, ids unique, labels str."""
    prompt_ids = [str(p) for p in prompt_ids]
    texts = list(texts)
    labels = ["" if v is None else str(v) for v in labels]
    n = len(prompt_ids)
    if n == 0:
        raise LayerscopeError("no prompts to cache")
    if len(texts) != n or len(labels) != n or (groups is not None and len(groups) != n):
        raise LayerscopeError(
            f"prompt_ids ({n}), texts ({len(texts)}), labels ({len(labels)})"
            + (f", groups ({len(groups)})" if groups is not None else "")
            + " must have the same length"
        )
    dupes = sorted(p for p, k in Counter(prompt_ids).items() if k > 1)
    if dupes:
        raise LayerscopeError(f"duplicate prompt_id(s): {name_list(dupes)}")
    return prompt_ids, texts, labels, groups


def _checked_model(bridge, req: CacheRequest, model_info) -> tuple[dict[str, Any], int, int]:
    """``(info, n_layers, d_model)``; the token-level layers and every component's hook exist."""
    info = dict(model_info) if model_info is not None else describe_model(bridge)
    n_layers = int(bridge.cfg.n_layers)
    d_model = int(bridge.cfg.d_model)
    bad_layers = [L for L in req.token_level_layers if not 0 <= L < n_layers]
    if bad_layers:
        raise LayerscopeError(
            f"token_level_layers {bad_layers} do not exist; the model has layers 0..{n_layers - 1}"
        )
    hook_dict = bridge.hook_dict
    for comp in req.components:
        if hook_name(comp, 0) not in hook_dict:
            raise LayerscopeError(
                f"component '{comp}' is not available for architecture {info.get('architecture')} "
                f"(no hook '{hook_name(comp, 0)}'"
                + ("; parallel-attention blocks have no resid_mid" if comp == "resid_mid" else "")
                + "); remove it from activations.components"
            )
    hf = bridge.model if hasattr(bridge, "layout") else getattr(bridge, "original_model", None)
    if req.self_check and not info.get("compatibility_mode") and hf is not None:
        # before any forward pass: a component the self-check could not verify is refused now
        parity.refuse_unchecked(req.components, hf.config, str(info.get("engine", "bridge")))
    return info, n_layers, d_model


def _check_lengths(prompt_ids, lengths, n_pooled, skip: int, n_ctx: int) -> None:
    """Every prompt has a token to pool and fits the model context (when it is known)."""
    n = len(prompt_ids)
    empty = [prompt_ids[i] for i in range(n) if n_pooled[i] == 0]
    if empty:
        raise LayerscopeError(
            "prompt(s) with no tokens left to pool"
            f"{' after leaving out BOS' if skip else ''}: {name_list(empty)}"
        )
    if n_ctx:
        too_long = [
            f"{prompt_ids[i]} ({lengths[i]} tokens)" for i in range(n) if lengths[i] > n_ctx
        ]
        if too_long:
            raise LayerscopeError(
                f"prompt(s) longer than the model context of {n_ctx} tokens: {name_list(too_long)}"
            )


def _plan(bridge, req: CacheRequest, prompts, info, n_layers: int, d_model: int) -> CachePlan:
    """Tokenize, check lengths, plan the batches and the self-check sample; cut out the shard."""
    prompt_ids, texts, labels, groups = prompts
    n = len(prompt_ids)
    tokenizer = getattr(bridge, "layerscope_tokenizer", None) or bridge.tokenizer
    prepend = resolve_bos(tokenizer, req.bos_policy)
    # A shard keeps only the lengths of other shards' prompts (for the global batch plan), so its
    # memory does not grow with the dataset; the ids of its own prompts come in a second pass.
    ids = token_arrays(tokenizer, texts, range(n), prepend, keep=req.shard is None)
    skip = 1 if (prepend and req.exclude_bos_from_pooling) else 0
    lengths = [len(x) for x in ids]
    n_pooled = [max(0, L - skip) for L in lengths]
    n_ctx = int(info.get("n_ctx") or getattr(bridge.cfg, "n_ctx", 0) or 0)
    _check_lengths(prompt_ids, lengths, n_pooled, skip, n_ctx)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        # value irrelevant: masked, right of real tokens
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    batches = make_batches(lengths, req.batch_size, req.max_tokens_per_batch)
    # The self-check sample is drawn from the whole table, so that shards check the same prompts
    # as the unsharded job (each shard those it holds; gather_store keeps the largest difference).
    check_rows = parity.sample_rows(lengths, int(req.self_check or 0))
    check_pids = [prompt_ids[i] for i in check_rows]
    rows = None
    if req.shard is not None:
        # Keep only this shard's prompts (ascending table order) and renumber them; each batch
        # keeps its members and their order, so its input tensor is the unsharded one.
        batches = shard_batches(batches, lengths, int(req.shard[0]), int(req.shard[1]))
        rows = sorted(i for b in batches for i in b)
        local = {g: k for k, g in enumerate(rows)}
        batches = [[local[i] for i in b] for b in batches]
        prompt_ids, texts, labels, lengths, n_pooled = (
            [seq[i] for i in rows] for seq in (prompt_ids, texts, labels, lengths, n_pooled)
        )
        ids = token_arrays(tokenizer, texts, range(len(rows)), prepend, keep=True)
        check_rows = [local[i] for i in check_rows if i in local]
        if groups is not None:
            groups = [groups[i] for i in rows]
    offsets = np.zeros(len(prompt_ids) + 1, dtype=np.int64)
    np.cumsum(n_pooled, out=offsets[1:])
    return CachePlan(
        prompt_ids=prompt_ids,
        texts=texts,
        labels=labels,
        groups=groups,
        ids=ids,
        lengths=lengths,
        n_pooled=n_pooled,
        offsets=offsets,
        batches=batches,
        rows=rows,
        n_total=n,
        check_rows=check_rows,
        check_pids=check_pids,
        prepend=prepend,
        skip=skip,
        pad_id=pad_id,
        info=info,
        n_layers=n_layers,
        d_model=d_model,
    )


def _make_hook(
    comp: str,
    layer: int,
    poolings: Sequence[str],
    keep_tokens: bool,
    is_stop: bool,
    state: dict[str, Any],
    stop_exc: type,
):
    """The hook on ``comp`` of ``layer``: pool the batch into ``state["captured"]``; maybe stop."""

    def hook(tensor, hook=None):
        x = tensor.detach().float()
        pm = state["pool_mask"]  # [B, T] bool
        out = {}
        if "mean" in poolings:
            w = pm.unsqueeze(-1).to(x.dtype)
            out["mean"] = (x * w).sum(dim=1) / state["counts"]
        if "max" in poolings:
            out["max"] = x.masked_fill(~pm.unsqueeze(-1), -math.inf).amax(dim=1)
        if "last" in poolings:
            out["last"] = x[state["rows"], state["last"]]
        if keep_tokens:
            out["none"] = x[pm]  # row-major: prompt by prompt, positions in order
        state["captured"][(comp, layer)] = {k: v.cpu() for k, v in out.items()}
        if is_stop:
            raise stop_exc(tensor)
        return None

    return hook


def _make_hooks(
    req: CacheRequest, plan: CachePlan, state: dict[str, Any], stop_exc: type
) -> list[tuple[str, Callable]]:
    """``(hook name, hook)`` for every component of every layer, layer by layer; the last one
    to fire raises ``stop_exc`` (with ``stop_early``) so the final norm and LM head never run."""
    stop_comp = max(req.components, key=lambda c: _FIRE_ORDER[c])
    stop_layer = plan.n_layers - 1
    return [
        (
            hook_name(c, L),
            _make_hook(
                c,
                L,
                req.poolings,
                L in req.token_level_layers,
                req.stop_early and c == stop_comp and L == stop_layer,
                state,
                stop_exc,
            ),
        )
        for L in range(plan.n_layers)
        for c in req.components
    ]


def _store_attrs(bridge, req: CacheRequest, plan: CachePlan) -> dict[str, Any]:
    """The attributes of the store (or shard) file: model, versions, settings, shapes."""
    info = plan.info
    attrs = {
        "kind": "store",
        "format_version": h5cache.FORMAT_VERSION,
        "model": info.get("model", "unknown"),
        "model_revision": info.get("model_revision"),
        "architecture": info.get("architecture", "unknown"),
        "transformer_lens_version": info.get("transformer_lens_version", tl_version()),
        "layerscope_version": LAYERSCOPE_VERSION,
        "n_layers": plan.n_layers,
        "d_model": plan.d_model,
        "n_prompts": plan.n,
        "hook_names": [HOOKS[c] for c in req.components],
        "dtype": info.get("dtype", "unknown"),
        "out_dtype": req.dtype_out,
        "bos": str(req.bos_policy).lower(),
        "prepend_bos": bool(plan.prepend),
        "exclude_bos_from_pooling": bool(req.exclude_bos_from_pooling),
        "compatibility_mode": bool(
            info.get("compatibility_mode", getattr(bridge, "compatibility_mode", False))
        ),
        "components": req.components,
        "poolings": req.poolings,
        "token_level_layers": req.token_level_layers,
        "pad_side": "right",
        "engine": str(info.get("engine", "native" if hasattr(bridge, "layout") else "bridge")),
    }
    if req.shard is not None:
        attrs.update(
            kind="shard",
            shard_index=int(req.shard[0]),
            n_shards=int(req.shard[1]),
            n_prompts_total=plan.n_total,
            batch_size=int(req.batch_size),
            max_tokens_per_batch=int(req.max_tokens_per_batch or 0),
        )
    return attrs


def _log_plan(req: CacheRequest, plan: CachePlan, device, log: Callable[[str], Any]) -> None:
    """Say what the job will compute: prompts, tokens, batches, layers, BOS and device."""
    n = plan.n
    if req.shard is not None:
        log(
            f"cache_store: shard {req.shard[0]} of {req.shard[1]} (numbered from 0): "
            f"{n} of {plan.n_total} prompts"
        )
    mtpb = req.max_tokens_per_batch
    tll = req.token_level_layers
    log(
        f"cache_store: {n} prompts, {int(sum(plan.lengths))} tokens, {len(plan.batches)} batches "
        f"(batch_size {req.batch_size}"
        f"{f', max_tokens_per_batch {mtpb}' if mtpb else ''}), "
        f"{plan.n_layers} layers x {req.components} x {req.poolings}"
        f"{f' + tokens of layers {tll}' if tll else ''}; "
        f"BOS {'prepended' if plan.prepend else 'not prepended'} (policy {req.bos_policy!r})"
        f"{', left out of pooling' if plan.skip else ''}; device {device}"
    )
    over = batches_over_cap(plan.lengths, plan.batches, mtpb)
    if over:
        log(
            f"WARNING max_tokens_per_batch_exceeded: {len(over)} of {len(plan.batches)} batches "
            f"hold one prompt longer than max_tokens_per_batch {mtpb} (the longest has "
            f"{max(plan.lengths)} tokens); a prompt is never split, so those batches exceed it: "
            f"raise models.<model>.max_tokens_per_batch to at least {max(plan.lengths)}"
        )


def _overflow_hint(model_dtype: str, dtype_out: str) -> str:
    """What to add to a non-finite-values error: half precision is where inf/NaN come from, so
    say which knob to turn."""
    if model_dtype == "float16":
        return (
            "; the model ran in float16, whose largest value is 65504: "
            "set the model's dtype to bfloat16 or float32"
        )
    if dtype_out == "float16":
        return "; activations overflowed out_dtype float16: set activations.out_dtype to float32"
    return ""


def _check_disk_space(req: CacheRequest, plan: CachePlan, out_path) -> None:
    """Refuse before the forward pass, not half way through writing it."""
    tll = req.token_level_layers
    needed = diskspace.estimate_store_bytes(
        plan.n_layers,
        plan.n,
        plan.d_model,
        len(req.components),
        len(req.poolings),
        int(plan.offsets[-1]) if tll else 0,
        len(tll),
        np.dtype(req.dtype_out).itemsize,
    )
    diskspace.check_free_space(Path(out_path).parent, needed, f"the activation store {out_path}")


def _create_store(f, req: CacheRequest, plan: CachePlan, attrs) -> tuple[dict, dict]:
    """Write the attributes and per-prompt data into the open file ``f``; create the (empty)
    activation datasets. Returns ``(pooled, token_level)`` datasets by (component, pooling)
    and by component."""
    n, d_model, dtype_out, compression = plan.n, plan.d_model, req.dtype_out, req.compression
    h5cache.set_attrs(f, attrs)
    if plan.rows is not None:
        f.create_dataset("shard_rows", data=np.asarray(plan.rows, dtype=np.int64))
    h5cache.write_strings(f, "prompt_id", plan.prompt_ids)
    h5cache.write_strings(f, "label", plan.labels)
    # the cache's key (not labels)
    h5cache.write_strings(f, "text_sha1", h5cache.text_hashes(plan.texts))
    if plan.groups is not None:
        h5cache.write_strings(f, "group", plan.groups)
    f.create_dataset("n_tokens", data=np.asarray(plan.lengths, dtype=np.int32))
    f.create_dataset("n_pooled", data=np.asarray(plan.n_pooled, dtype=np.int32))
    pooled_ds = {
        (c, p): h5cache.create_float(
            f, f"{c}/{p}", (plan.n_layers, n, d_model), dtype_out, compression
        )
        for c in req.components
        for p in req.poolings
    }
    token_ds = {}
    if req.token_level_layers:
        f.create_dataset(
            "token_ids",
            data=np.concatenate([x[plan.skip :] for x in plan.ids] or [np.zeros(0, np.int64)]),
        )
        for c in req.components:
            token_ds[c] = h5cache.create_float(
                f,
                f"{c}/none/values",
                (len(req.token_level_layers), int(plan.offsets[-1]), d_model),
                dtype_out,
                compression,
            )
            f.create_dataset(f"{c}/none/offsets", data=plan.offsets)
    return pooled_ds, token_ds


def _forward(run: _CacheRun, batch: list[int], T: int) -> dict:
    """One padded forward pass of ``batch`` (width ``T``); the pooled vectors it captured."""
    import torch

    plan, state, device = run.plan, run.state, run.device
    B = len(batch)
    input_ids = torch.full((B, T), int(plan.pad_id), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for r, i in enumerate(batch):
        input_ids[r, : plan.lengths[i]] = torch.from_numpy(plan.ids[i])
        mask[r, : plan.lengths[i]] = 1
    input_ids = input_ids.to(device)
    mask = mask.to(device)
    pool_mask = mask.bool().clone()
    pool_mask[:, : plan.skip] = False
    state["pool_mask"] = pool_mask
    state["counts"] = pool_mask.sum(dim=1, keepdim=True).float()
    state["rows"] = torch.arange(B, device=device)
    state["last"] = torch.tensor([plan.lengths[i] - 1 for i in batch], device=device)
    state["captured"] = {}
    run.bridge(input_ids, attention_mask=mask, return_type=None)
    captured = state.pop("captured")
    if len(captured) != len(run.fwd_hooks):
        keys = [(c, L) for L in range(plan.n_layers) for c in run.req.components]
        missing = [h for (h, _), key in zip(run.fwd_hooks, keys) if key not in captured]
        raise LayerscopeError(f"hooks did not fire: {name_list(missing)}")
    return captured


def _run_batch(run: _CacheRun, batch: list[int], T: int) -> None:
    """Forward and write ``batch``; on CUDA out-of-memory, halve it and retry each half at the
    same width ``T`` (each row then sees exactly the input it had in the whole batch)."""
    import torch

    plan = run.plan
    try:
        captured = _forward(run, batch, T)
    except torch.cuda.OutOfMemoryError as exc:
        run.state.pop("captured", None)
        if len(batch) == 1:
            raise LayerscopeError(
                f"CUDA out of memory on prompt {plan.prompt_ids[batch[0]]} "
                f"({plan.lengths[batch[0]]} tokens) "
                "alone: use a smaller dtype, a bigger GPU or shorter prompts"
            ) from exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        run.log(
            f"cache_store: CUDA out of memory on a batch of {len(batch)} prompts x {T} tokens; "
            f"retrying it as {half} + {len(batch) - half} "
            "(lower max_tokens_per_batch to avoid this)"
        )
        _run_batch(run, batch[:half], T)
        _run_batch(run, batch[half:], T)
        return
    _write_batch(
        batch,
        captured,
        run.req.components,
        run.req.poolings,
        plan.n_layers,
        run.pooled_ds,
        run.token_ds,
        {L: k for k, L in enumerate(run.req.token_level_layers)},
        plan.offsets,
        run.req.dtype_out,
        plan.prompt_ids,
        run.overflow_hint,
    )
    del captured  # one batch of activations at a time


def _run_batches(run: _CacheRun, t0: float) -> None:
    """Run every batch with the hooks on, logging progress every ``progress_every_s``."""
    import torch

    plan, n = run.plan, run.plan.n
    total_real = int(sum(plan.lengths))
    last_log = t0
    done_prompts = 0
    done_tokens = 0
    with torch.inference_mode(), run.bridge.hooks(fwd_hooks=run.fwd_hooks):
        for batch in plan.batches:
            _run_batch(run, batch, max(plan.lengths[i] for i in batch))
            done_prompts += len(batch)
            done_tokens += sum(plan.lengths[i] for i in batch)
            now = time.perf_counter()
            if now - last_log >= run.req.progress_every_s or done_prompts == n:
                el = max(now - t0, 1e-9)
                run.log(
                    f"cache_store: {done_prompts}/{n} prompts, "
                    f"{done_tokens}/{total_real} tokens, "
                    f"{done_tokens / el:.0f} tokens/s, {el:.1f} s"
                )
                last_log = now


def _write_batch(
    batch,
    captured,
    components,
    poolings,
    n_layers,
    pooled_ds,
    token_ds,
    tl_index,
    offsets,
    dtype_out,
    prompt_ids,
    hint: str = "",
) -> None:
    """Check one batch's captured vectors are finite and write them into the store's datasets."""
    for c in components:
        for p in poolings:
            arr = np.stack([captured[(c, L)][p].numpy() for L in range(n_layers)]).astype(
                dtype_out, copy=False
            )
            _check_finite(arr, c, p, batch, prompt_ids, layers=list(range(n_layers)), hint=hint)
            pooled_ds[(c, p)][:, batch, :] = arr
        for L, k in tl_index.items():
            vals = captured[(c, L)]["none"].numpy().astype(dtype_out, copy=False)
            bad = ~np.isfinite(vals).all(axis=1)
            pos = 0
            for i in batch:
                cnt = int(offsets[i + 1] - offsets[i])
                if bad[pos : pos + cnt].any():
                    raise LayerscopeError(
                        f"non-finite activations (inf/NaN) in {c} layer {L} (token level) "
                        f"for prompt {prompt_ids[i]}" + hint
                    )
                pos += cnt
            if pos != vals.shape[0]:  # pragma: no cover - internal consistency
                raise LayerscopeError(
                    f"token count mismatch in {c} layer {L}: {pos} vs {vals.shape[0]}"
                )
            start, stop = int(offsets[batch[0]]), int(offsets[batch[-1] + 1])
            if stop - start == pos:  # contiguous prompts: one write
                token_ds[c][k, start:stop, :] = vals
            else:
                pos = 0
                for i in batch:
                    cnt = int(offsets[i + 1] - offsets[i])
                    token_ds[c][k, int(offsets[i]) : int(offsets[i + 1]), :] = vals[pos : pos + cnt]
                    pos += cnt


def _check_finite(
    arr: np.ndarray,
    component: str,
    pooling: str,
    batch: Sequence[int],
    prompt_ids,
    layers,
    hint: str = "",
) -> None:
    """Raise naming layers and prompts if the pooled ``arr`` [n_layers, B, d] has inf/NaN."""
    finite = np.isfinite(arr).all(axis=2)  # [n_layers, B]
    if finite.all():
        return
    bad_layers = [layers[k] for k in np.flatnonzero(~finite.all(axis=1))]
    bad_prompts = [prompt_ids[batch[r]] for r in np.flatnonzero(~finite.all(axis=0))]
    raise LayerscopeError(
        f"non-finite activations (inf/NaN) in {component}/{pooling} at layer(s) {bad_layers} "
        f"for prompt(s) {name_list(bad_prompts)}{hint}"
    )


def extract_layer(
    store_path: str | os.PathLike,
    layer: int,
    out_path: str | os.PathLike,
    table: str | os.PathLike | None = None,
) -> Path:
    """Write ``layer`` of the store to ``out_path`` (``layer_{L}.h5`` layout), atomically; with
    ``table``, labels and groups come from that prompt table (see :func:`h5cache.copy_layer`)."""
    with atomic_path(out_path) as tmp:
        h5cache.copy_layer(store_path, int(layer), out_path, tmp, table=table)
    return Path(out_path)


def cache_from_table(
    table: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    model: ModelSettings | Mapping[str, Any],
    activations: ActivationSettings | Mapping[str, Any] | None = None,
    batch_size: int = 32,
    device: str = "auto",
    threads: int | None = None,
    log: Callable[[str], Any] | None = print,
    max_tokens_per_batch: int | None = None,
    shard: tuple[int, int] | None = None,
    engine: str = "auto",
    self_check: int = 4,
) -> dict[str, Any]:
    """Workflow entry point: prompt table CSV (prompt_id, text[, label, group]) -> store HDF5
    (or, with ``shard=(i, n)``, shard ``i`` of ``n`` of it; see :func:`cache_store`).

    ``model``, ``activations``: typed settings, or mappings completed from the schema's defaults
    (only source, revision, dtype, compatibility_mode and bos of the model are used). ``engine``
    (auto | native | bridge, see :func:`load_engine`) and ``self_check`` (prompts the parity
    self-check recomputes, 0 = off) change the numbers only by float noise.
    """
    import torch

    log = log or (lambda msg: None)
    model, act = ModelSettings.of(model), ActivationSettings.of(activations)
    df = read_texts_table(table)
    if threads and device in ("cpu", "auto"):
        torch.set_num_threads(int(threads))
    bridge, info = _load_for_cache(model, act, engine, device, log)
    return cache_store(
        bridge,
        df["prompt_id"].tolist(),
        df["text"].tolist(),
        df["label"].tolist() if "label" in df.columns else [""] * len(df),
        store_path,
        components=list(act.components),
        poolings=list(act.poolings),
        prepend_bos=model.bos,
        exclude_bos_from_pooling=act.exclude_bos_from_pooling,
        token_level_layers=list(act.token_level_layers),
        batch_size=int(batch_size),
        max_tokens_per_batch=max_tokens_per_batch,
        log=log,
        dtype_out=act.out_dtype,
        compression=act.compression,
        model_info=info,
        groups=df["group"].tolist() if "group" in df.columns else None,
        shard=shard,
        self_check=int(self_check or 0),
    )


def _load_for_cache(model: ModelSettings, act: ActivationSettings, engine, device, log):
    """Load the engine for ``model`` (see :func:`load_engine`) and log what was loaded."""
    t = time.perf_counter()
    bridge, info = load_from_settings(
        model, act.components, engine=engine or "auto", device=device or "auto", log=log
    )
    attn = ", attention " + info["attn_implementation"] if "attn_implementation" in info else ""
    log(
        f"loaded {info['model']} ({info['architecture']}, {info['n_layers']} layers, "
        f"d_model {info['d_model']}, {info['dtype']}, {info['device']}, engine {info['engine']}"
        f"{attn}) in {time.perf_counter() - t:.1f} s"
    )
    return bridge, info


def gather_store(
    shard_paths: Sequence[str | os.PathLike],
    store_path: str | os.PathLike,
    log: Callable[[str], Any] | None = print,
) -> Path:
    """Join the shard files of one (model, dataset) into its store, atomically."""
    with atomic_path(store_path) as tmp:
        info = h5cache.gather_shards(shard_paths, tmp, out_path=store_path)
        parity.gather_max_diff(shard_paths, tmp)
    if log:
        log(f"gathered {len(shard_paths)} shard(s), {info['n_prompts']} prompts, into {store_path}")
    return Path(store_path)
