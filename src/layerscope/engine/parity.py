"""The parity self-check of a caching job: recompute a few prompts with plain ``transformers`` and
compare them with what the engine wrote.

The reference runs each sampled prompt alone (no padding, no batching, no early stop) through the
plain HF model: ``output_hidden_states`` gives resid_pre of every layer, a forward hook on each
decoder layer gives resid_post. attn_out / resid_mid / mlp_out come from forward hooks on the HF
modules of the native layout table, and are only trusted after the per-token identities of
:func:`identities` (``resid_pre + attn_out + mlp_out == resid_post`` in parallel blocks;
``resid_pre + attn_out == resid_mid`` and ``resid_mid + mlp_out == resid_post`` in sequential
ones, with the stream read around any norm that sits on it) hold on that same pass. Every
component a job writes must have a reference (:func:`refuse_unchecked`): a component the reference
cannot recompute is refused rather than written unverified. So a wrong tap point, a padding or
pooling bug, or a bridge that computes a layout differently all show up as a difference here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from layerscope.engine.loading import model_device, torch_dtype
from layerscope.errors import LayerscopeError, name_list

#: Largest allowed difference, relative to max(1, largest |value| of that component and layer).
TOLERANCE = {"float64": 1e-8, "float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def tolerance(model_dtype: str, out_dtype: str = "float32") -> float:
    """The largest relative difference the self-check accepts for this model and out dtype."""
    tol = TOLERANCE.get(str(model_dtype).replace("torch.", ""), 1e-4)
    return max(tol, 2e-3) if out_dtype == "float16" else tol  # float16 storage rounds to ~5e-4


def sample_rows(lengths: Sequence[int], k: int = 4) -> list[int]:
    """Up to ``k`` prompt rows: the longest, the shortest and evenly spaced lengths between them."""
    if k <= 0 or not lengths:
        return []
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    picks = [order[-1], order[0]] + [
        order[round(j * (len(order) - 1) / (k - 1))] for j in range(1, k - 1)
    ]
    out: list[int] = []
    for i in picks:
        if i not in out:
            out.append(i)
    return sorted(out[:k])


def reference_pass(hf_model, token_ids: Sequence[int]) -> dict[tuple[str, int], np.ndarray]:
    """Per-token values ``{(component, layer): [T, d] float64}`` of one unpadded prompt: every
    component the native layout table defines for the model's placement (only the residuals for
    an architecture outside the table). Raises if they do not add up to the residual stream."""
    import torch

    from layerscope.engine import native

    try:
        layout = native.layout_for(hf_model.config)
        layers = native.submodule(hf_model, layout.layers)
    except LayerscopeError:  # a layout the native table does not know: residuals only
        layout = native.Layout("", attn=None, mlp=None, mid=None)
        layers = find_layers(hf_model)
    got: dict[tuple[str, int], Any] = {}
    handles = []

    def keep(comp, L, pre=False):
        def hook(module, args, out=None):
            # a copy now: Falcon adds to its MLP output in place after this hook
            x = (args[0] if args else None) if pre else native.first_output(out)
            got[(comp, L)] = x.detach().reshape(-1, x.shape[-1]).double().cpu().numpy()

        return hook

    def tap(layer, path, comp, L, pre=False):
        module = native.submodule(layer, path)
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handles.append(register(keep(comp, L, pre=pre)))

    for L, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(keep("resid_post", L)))
        if layout.attn:
            tap(layer, layout.attn, "attn_out", L)
        if layout.mlp:
            tap(layer, layout.mlp, "mlp_out", L)
        if layout.mid:
            tap(layer, layout.mid, "resid_mid", L, pre=not layout.mid_out)
        # the stream around the norms that sit on it, for the identities
        if layout.residual_norm:
            tap(layer, layout.residual_norm, "_residual", L)
        if layout.attn_norm:
            tap(layer, layout.attn_norm, "_after_attn", L, pre=True)
        if layout.mlp_norm:
            tap(layer, layout.mlp_norm, "_after_mlp", L, pre=True)
    try:
        with torch.inference_mode():
            ids = torch.tensor([list(token_ids)], device=next(hf_model.parameters()).device)
            base = getattr(
                hf_model, hf_model.base_model_prefix, hf_model
            )  # no LM head: not compared
            # One unpadded prompt, but the mask is given: without it transformers warns on every
            # call whose ids contain the pad id (here the BOS, which GPT-2 uses as its pad token).
            out = base(
                input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True
            )
    finally:
        for h in handles:
            h.remove()
    for L in range(len(layers)):
        got[("resid_pre", L)] = out.hidden_states[L][0].double().cpu().numpy()
    _check_identities(got, len(layers), layout, hf_model.config)
    return {k: v for k, v in got.items() if not k[0].startswith("_")}


def find_layers(hf_model):
    """The decoder layer list of any causal LM: its ModuleList with one entry per hidden layer."""
    import torch

    config = hf_model.config
    n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for module in hf_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    raise LayerscopeError(
        f"parity self-check: cannot find the {n} decoder layers of architecture {arch}; "
        "set the model's self_check: 0 to cache without it"
    )


def identities(got, L: int, layout) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(what, a, b)``: the sums that must hold in layer ``L`` if the tap points are what the
    component definitions say (docs/methods.md): parallel blocks add both sublayers to the block
    input; sequential ones add the attention to the residual (the block input, or the norm of it
    that BLOOM's post-norm residual is), giving the stream the MLP sublayer reads (resid_mid, or
    the input of the norm on the stream after it), and the MLP to resid_mid, giving what the next
    block reads (resid_post, or the input of the norm after it)."""
    g = got.get
    pre, post = got[("resid_pre", L)], got[("resid_post", L)]
    attn, mid, mlp = g(("attn_out", L)), g(("resid_mid", L)), g(("mlp_out", L))
    if layout.parallel:
        if attn is None or mlp is None:
            return []
        return [("resid_pre + attn_out + mlp_out vs resid_post", pre + attn + mlp, post)]
    checks = []
    residual = g(("_residual", L), pre)
    after_attn = g(("_after_attn", L)) if layout.attn_norm else mid
    if attn is not None and after_attn is not None:
        what = "the attention's residual + attn_out vs " + (
            f"the input of {layout.attn_norm}" if layout.attn_norm else "resid_mid"
        )
        checks.append((what, residual + attn, after_attn))
    after_mlp = g(("_after_mlp", L)) if layout.mlp_norm else post
    if mid is not None and mlp is not None and after_mlp is not None:
        what = "resid_mid + mlp_out vs " + (
            f"the input of {layout.mlp_norm}" if layout.mlp_norm else "resid_post"
        )
        checks.append((what, mid + mlp, after_mlp))
    return checks


def _check_identities(got, n_layers: int, layout, config) -> None:
    """The tap points must add up to the residual stream on the reference pass itself."""
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    for L in range(n_layers):
        scale = max(1.0, float(np.abs(got[("resid_post", L)]).max()))
        for what, a, b in identities(got, L, layout):
            diff = float(np.abs(a - b).max()) / scale
            if diff > 1e-3:
                raise LayerscopeError(
                    f"parity self-check: on architecture {arch}, layer {L}, {what} "
                    f"differ by {diff:.3g}: "
                    "the native tap points do not fit this layout; use engine: bridge"
                )


def checkable(config) -> tuple[str, ...]:
    """The components :func:`reference_pass` recomputes for ``config``: those the native layout
    table defines for its placement, only the residuals for an architecture outside it."""
    from layerscope.engine import native

    try:
        return native.supported_components(config)
    except LayerscopeError:
        return native.UNIVERSAL


def refuse_unchecked(
    components: Sequence[str], config, engine: str, have: Sequence[str] | None = None
) -> None:
    """Raise, naming each component, if the self-check cannot verify every one a job writes
    (``have``: what the reference recomputed, default :func:`checkable`): an unverified component
    is how a wrong tap point would pass unnoticed."""
    from layerscope.engine import native

    have = checkable(config) if have is None else have
    missing = [c for c in components if c not in have]
    if not missing:
        return
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    try:
        native.layout_for(config)
        whys = [native.why_unsupported(config, c) for c in missing]
    except LayerscopeError as exc:
        whys = [f"component '{c}' has no plain-transformers reference ({exc})" for c in missing]
    raise LayerscopeError(
        f"parity self-check cannot verify {', '.join(missing)} on architecture {arch} "
        f"(engine {engine}): "
        + "; ".join(whys)
        + ". Remove "
        + ("it" if len(missing) == 1 else "them")
        + " from activations.components, or set the model's self_check: 0 to write "
        "unverified values"
    )


def pool(x: np.ndarray, pooling: str, skip: int) -> np.ndarray:
    x = x[skip:]
    if pooling == "mean":
        return x.mean(axis=0)
    if pooling == "max":
        return x.max(axis=0)
    return x[-1]


def compare(
    stored: Callable[[str, str, int, int], np.ndarray],
    reference: dict[int, dict[tuple[str, int], np.ndarray]],
    components: Sequence[str],
    poolings: Sequence[str],
    n_layers: int,
    skip: int,
) -> dict[str, tuple[float, int, int]]:
    """Largest relative difference per component: ``{component: (diff, layer, row)}``.
    ``stored(component, pooling, layer, row)`` reads the engine's value."""
    worst: dict[str, tuple[float, int, int]] = {}
    for row, ref in reference.items():
        for c in components:
            for L in range(n_layers):
                tokens = ref[(c, L)]
                scale = max(1.0, float(np.abs(tokens[skip:]).max()))
                for p in poolings:
                    d = float(np.abs(stored(c, p, L, row) - pool(tokens, p, skip)).max()) / scale
                    if d >= worst.get(c, (-1.0, 0, 0))[0]:
                        worst[c] = (d, L, row)
    return worst


def reference_model(model, info: Mapping[str, Any]):
    """The plain HF model the self-check recomputes with: the native engine's own model (it is
    not wrapped), or for the bridge a separately loaded copy (the bridge swaps the HF
    submodules)."""
    if hasattr(model, "layout"):
        return model.model
    from transformers import AutoModelForCausalLM

    rev = info.get("model_revision")
    kw = {"revision": rev} if rev and rev != "local" else {}
    dtype = torch_dtype(info.get("dtype", "float32"))
    hf = AutoModelForCausalLM.from_pretrained(info["model"], dtype=dtype, **kw)
    return hf.to(model_device(model)).eval()


def self_check(
    model, f, ids, rows, sample_pids, prompt_ids, k, skip, components, poolings, attrs, log
) -> dict:
    """Recompute the sampled prompts (local ``rows`` of the open store ``f``) with plain
    transformers and compare; raise naming architecture, component and difference beyond the
    tolerance."""
    arch = attrs["architecture"]
    if attrs["compatibility_mode"]:
        log(
            "parity self-check skipped: compatibility_mode folds LayerNorm, "
            "so values are not plain transformers'"
        )
        return {"self_check": "skipped (compatibility_mode)"}
    tol = tolerance(attrs["dtype"], attrs["out_dtype"])
    common = {"self_check": k, "self_check_tolerance": tol, "self_check_prompts": sample_pids}
    if not rows:
        log(f"parity self-check: none of its sample ({name_list(sample_pids)}) is in this shard")
        return common
    hf = reference_model(model, attrs)
    try:
        ref = {r: reference_pass(hf, [int(t) for t in ids[r]]) for r in rows}
    except LayerscopeError:
        raise
    except Exception as exc:  # an architecture the reference cannot tap: say so, never a traceback
        raise LayerscopeError(
            f"parity self-check could not recompute architecture {arch}: "
            f"{type(exc).__name__}: {exc}; set self_check: 0 to skip it"
        ) from exc
    # every written component is checked: one without a reference is refused, not skipped
    have = [c for c in components if all((c, 0) in ref[r] for r in rows)]
    refuse_unchecked(components, hf.config, attrs.get("engine", "bridge"), have)
    cache: dict[tuple[str, str], np.ndarray] = {}

    def stored(c, p, L, row):
        if (c, p) not in cache:
            cache[(c, p)] = f[f"{c}/{p}"][:, rows, :].astype(np.float64)
        return cache[(c, p)][L, rows.index(row)]

    worst = compare(stored, ref, components, poolings, attrs["n_layers"], skip)
    biggest = max((v[0] for v in worst.values()), default=0.0)
    log(
        f"parity self-check on {len(rows)} prompt(s) ({name_list([prompt_ids[r] for r in rows])}): "
        f"largest relative difference from plain transformers {biggest:.3g} "
        f"(tolerance {tol:g} for {attrs['dtype']}); "
        + ", ".join(f"{c} {v[0]:.2g}" for c, v in worst.items())
    )
    for c, (d, L, r) in worst.items():
        if d > tol:
            raise LayerscopeError(
                f"parity self-check failed: architecture {arch}, component {c}, layer {L}, "
                f"prompt {prompt_ids[r]}: the {attrs.get('engine', 'model')} engine's values "
                f"differ from plain transformers by {d:.3g} "
                f"(relative; tolerance {tol:g} for {attrs['dtype']}). "
                "These activations are not trustworthy; "
                "try the other engine (models.<name>.engine) or report the architecture"
            )
    return {**common, "self_check_max_diff": biggest}


def gather_max_diff(shard_paths, store_tmp) -> None:
    """The store's self-check difference is the largest of its shards' (each checked the prompts of
    the one table-wide sample that it holds), so it equals the unsharded job's."""
    import h5py

    diffs = []
    for path in shard_paths:
        with h5py.File(path, "r") as f:
            if "self_check_max_diff" in f.attrs:
                diffs.append(float(f.attrs["self_check_max_diff"]))
    if diffs:
        with h5py.File(store_tmp, "r+") as f:
            f.attrs["self_check_max_diff"] = max(diffs)
