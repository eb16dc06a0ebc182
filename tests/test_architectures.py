"""The architecture matrix: every family and every norm placement its config flags allow
(pre-norm, post-norm, sandwich, parallel), as a tiny random model with every weight, bias and norm
perturbed and small sliding windows, cached through layerscope and compared with plain
``transformers`` (one prompt at a time, no padding).

The reference is independent of the engine's tap table (``native.LAYOUTS``): resid_pre comes from
``output_hidden_states``, resid_post from forward hooks on the decoder layers, and attn_out /
resid_mid / mlp_out from hooks on the HF modules that :data:`DEFINITIONS` names for each variant,
written out from the ``transformers`` source after the component definitions of docs/methods.md
("Component definitions"). On top of that the stored values must add up to the stream, with the
HF norm modules that sit on it applied (:data:`STREAM_NORMS`), and every pooling must be the
pooling of the stored per-token values. A cell is either exact within 1e-4 or refused by a
LayerscopeError that names the component.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from devkit.tiny_models import FAMILIES, build_family_model
from layerscope.engine.loading import load_engine
from layerscope.engine.store import cache_store
from layerscope.engine.tokens import resolve_bos, tokenize_prompts
from layerscope.errors import LayerscopeError

pytest.importorskip("transformer_lens")

COMPONENTS = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
POOLINGS = ["mean", "last", "max"]
TEXTS = [
    "The capital of France is Paris and the Eiffel Tower is located in Paris.",
    "847",
    "Which is larger: 12 or 71? Answer: 71",
    "the quick brown fox jumps over the lazy dog, again and again.",
    "Answer minimally",
]
PIDS = [f"p{i}" for i in range(len(TEXTS))]
LABELS = ["a", "b"] * 2 + ["a"]
ATOL = 1e-4

# -- the independent definitions ---------------------------------------------------------------
#: component -> (HF module path relative to the decoder layer, "in" for its input or "out" for
#: its output). Pre-norm: the stream after the attention is the input of the norm before the MLP.
_PRE_NORM = {
    "attn_out": ("self_attn", "out"),
    "resid_mid": ("post_attention_layernorm", "in"),
    "mlp_out": ("mlp", "out"),
}
_PARALLEL = {"attn_out": ("self_attn", "out"), "mlp_out": ("mlp", "out")}
#: Sandwich norms: the value added to the stream is the output of the norm after each sublayer.
_SANDWICH = {
    "attn_out": ("post_attention_layernorm", "out"),
    "resid_mid": ("pre_feedforward_layernorm", "in"),
    "mlp_out": ("post_feedforward_layernorm", "out"),
}
_GPT2 = {"attn_out": ("attn", "out"), "resid_mid": ("ln_2", "in"), "mlp_out": ("mlp", "out")}
_NEOX = {"attn_out": ("attention", "out"), "mlp_out": ("mlp", "out")}
_FALCON_PARALLEL = {"attn_out": ("self_attention", "out"), "mlp_out": ("mlp", "out")}
#: BLOOM's attention and MLP modules add the residual themselves: what they add is the output of
#: their output projections.
_BLOOM = {"attn_out": ("self_attention.dense", "out"), "mlp_out": ("mlp.dense_4h_to_h", "out")}
DEFINITIONS: dict[str, dict[str, tuple[str, str]]] = {
    **{
        f: _PRE_NORM
        for f in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3", "olmo")
    },
    "stablelm": _PRE_NORM,
    "stablelm_parallel": _PARALLEL,
    "gemma2": _SANDWICH,
    "gemma3": _SANDWICH,
    # OLMo 2: norms after each sublayer only; the MLP reads the stream itself
    "olmo2": {**_SANDWICH, "resid_mid": ("mlp", "in")},
    "phi": _PARALLEL,
    "gpt2": _GPT2,
    "gpt_neo": _GPT2,
    "gptj": {"attn_out": ("attn", "out"), "mlp_out": ("mlp", "out")},
    "gpt_neox": _NEOX,
    "gpt_neox_sequential": {**_NEOX, "resid_mid": ("post_attention_layernorm", "in")},
    "opt": {
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("final_layer_norm", "in"),
        "mlp_out": ("fc2", "out"),
    },
    # post-norm: the stream after the attention is self_attn_layer_norm's output
    "opt_post_ln": {
        "attn_out": ("self_attn", "out"),
        "resid_mid": ("self_attn_layer_norm", "out"),
        "mlp_out": ("fc2", "out"),
    },
    "bloom": {**_BLOOM, "resid_mid": ("post_attention_layernorm", "in")},
    # the residual is normed: post_attention_layernorm's output is what the MLP reads and adds to
    "bloom_post_ln": {**_BLOOM, "resid_mid": ("post_attention_layernorm", "out")},
    "falcon_sequential": {
        "attn_out": ("self_attention", "out"),
        "resid_mid": ("post_attention_layernorm", "in"),
        "mlp_out": ("mlp", "out"),
    },
    **{
        f: _FALCON_PARALLEL
        for f in (
            "falcon_new_decoder",
            "falcon_new_decoder_one_ln",
            "falcon_parallel",
            "falcon_parallel_alibi",
        )
    },
}
DEFINITIONS["falcon_sequential_alibi"] = DEFINITIONS["falcon_sequential"]
#: Norms that sit on the stream: "residual", the norm of the block input that the attention adds
#: to; "attn" / "mlp", the norm applied to the stream after the attention / MLP addition.
STREAM_NORMS = {
    "opt_post_ln": {"attn": "self_attn_layer_norm", "mlp": "final_layer_norm"},
    "bloom_post_ln": {"residual": "input_layernorm", "attn": "post_attention_layernorm"},
}
#: Parallel blocks: attention and MLP both read the block input; resid_mid has no definition.
PARALLEL = {f for f, d in DEFINITIONS.items() if "resid_mid" not in d}
#: Layouts the TransformerBridge 4.3 gets wrong or cannot boot: refused by name.
BRIDGE_REFUSED = {
    "falcon_new_decoder": "new_decoder_architecture",
    "falcon_new_decoder_one_ln": "new_decoder_architecture",
    "falcon_sequential_alibi": "ALiBi",
    "falcon_parallel_alibi": "ALiBi",
}
#: Components the bridge computes differently from the definitions: the self-check refuses them.
BRIDGE_WRONG = {"bloom_post_ln": {"resid_mid"}, "opt_post_ln": {"resid_mid"}}


def _module(layer, path):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda fam: (
        build_family_model(root / fam, fam) if not (root / fam).exists() else root / fam
    )


@pytest.fixture(scope="module")
def references(family_dirs):
    """family -> (HF model, {prompt ids: {(component, layer): [T, d] float64}}), built once per
    family for the native and the bridge test."""
    from transformers import AutoTokenizer

    built = {}

    def get(fam):
        if fam not in built:
            d = family_dirs(fam)
            tok = AutoTokenizer.from_pretrained(d)
            ids = tokenize_prompts(tok, TEXTS, prepend_bos=resolve_bos(tok, "auto"))
            built[fam] = _reference(d, fam, ids)
        return built[fam]

    return get


def _reference(model_dir, family, token_ids):
    """The HF model and ``{ids: {(component, layer): [T, d] float64}}`` by :data:`DEFINITIONS`."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = next(
        m
        for m in hf.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == hf.config.num_hidden_layers
    )
    taps = {"resid_post": ("", "out"), **DEFINITIONS[family]}
    out = {}
    for ids in token_ids:
        got = {}

        def keep(c, L, kind, got=got):
            def hook(mod, args, o=None):
                x = args[0] if kind == "in" else (o[0] if isinstance(o, tuple) else o)
                # a copy now (Falcon adds to its MLP output in place); OPT's MLP runs on [T, d]
                got[(c, L)] = x.detach().reshape(-1, x.shape[-1]).double().numpy().copy()

            return hook

        handles = []
        for L, layer in enumerate(layers):
            for c, (path, kind) in taps.items():
                m = _module(layer, path) if path else layer
                reg = m.register_forward_pre_hook if kind == "in" else m.register_forward_hook
                handles.append(reg(keep(c, L, kind)))
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True)
        for h in handles:
            h.remove()
        got.update(
            {("resid_pre", L): res.hidden_states[L][0].double().numpy() for L in range(len(layers))}
        )
        out[tuple(ids)] = got
    return hf, out


def _stream_identities(hf, family, L, got):
    """The stored components add up to the stream: parallel blocks ``pre + attn + mlp == post``;
    sequential ones ``N_a(R(pre) + attn) == mid`` and ``N_m(mid + mlp) == post``, with the HF norm
    modules of :data:`STREAM_NORMS` (identity where there is none)."""
    import torch

    layer = next(
        m
        for m in hf.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == hf.config.num_hidden_layers
    )[L]
    norms = STREAM_NORMS.get(family, {})

    def norm(which, x):
        if which not in norms:
            return x
        with torch.no_grad():
            return _module(layer, norms[which])(torch.from_numpy(x).float()).double().numpy()

    pre, post = got["resid_pre"], got["resid_post"]
    if family in PARALLEL:
        return [("pre + attn + mlp vs post", pre + got["attn_out"] + got["mlp_out"], post)]
    # the bridge-wrong cells are left out of the store's identity (their own check fails them)
    mid = got.get("resid_mid")
    return [
        ("N(R(pre) + attn) vs mid", norm("attn", norm("residual", pre) + got["attn_out"]), mid),
        ("N(mid + mlp) vs post", norm("mlp", mid + got["mlp_out"]), post),
    ]


def _pool(x, pooling):
    return {"mean": x.mean(0), "last": x[-1], "max": x.max(0)}[pooling]


def _cache(model, info, path, comps, self_check=None):
    cache_store(
        model,
        PIDS,
        TEXTS,
        LABELS,
        path,
        components=comps,
        poolings=POOLINGS,
        token_level_layers=[0, 1],
        batch_size=3,
        model_info=info,
        log=None,
        self_check=self_check,
    )


def _check_store(path, family, reference, tokenizer, comps, identities=True):
    """Every stored component against the reference, token by token and pooled; returns the
    largest absolute difference per component."""
    hf, ref = reference
    ids = tokenize_prompts(tokenizer, TEXTS, prepend_bos=resolve_bos(tokenizer, "auto"))
    worst = dict.fromkeys(comps, 0.0)
    with h5py.File(path) as f:
        skip = int(bool(f.attrs["prepend_bos"]) and bool(f.attrs["exclude_bos_from_pooling"]))
        offsets = f[f"{comps[0]}/none/offsets"][()]
        tok = {(c, L): f[f"{c}/none/values"][L].astype(np.float64) for c in comps for L in (0, 1)}
        pooled = {(c, p): f[f"{c}/{p}"][()].astype(np.float64) for c in comps for p in POOLINGS}
    for i, t in enumerate(ids):
        r = ref[tuple(t)]
        for L in (0, 1):
            got = {c: tok[(c, L)][offsets[i] : offsets[i + 1]] for c in comps}
            for c in comps:
                np.testing.assert_allclose(
                    got[c], r[(c, L)][skip:], atol=ATOL, rtol=0, err_msg=f"{c} L{L} p{i}"
                )
                worst[c] = max(worst[c], float(np.abs(got[c] - r[(c, L)][skip:]).max()))
                assert np.abs(got[c]).max() > 1e-3, f"{c} L{L} p{i} is all zero"
            if identities:
                for what, a, b in _stream_identities(hf, family, L, got):
                    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0, err_msg=f"{what} L{L}")
            for c in comps:
                for p in POOLINGS:
                    np.testing.assert_allclose(
                        pooled[(c, p)][L, i],
                        _pool(got[c], p),
                        atol=ATOL,
                        rtol=0,
                        err_msg=f"{c}/{p} L{L} p{i}",
                    )
    return worst


def _report(engine, family, cells):
    """Append the matrix cells to $LAYERSCOPE_MATRIX_REPORT (for the issue's table), if set."""
    path = os.environ.get("LAYERSCOPE_MATRIX_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"engine": engine, "family": family, "cells": cells}) + "\n")


def test_definitions_cover_the_matrix():
    assert set(DEFINITIONS) == set(FAMILIES)
    assert set(STREAM_NORMS) | set(BRIDGE_REFUSED) | set(BRIDGE_WRONG) <= set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_engine_equals_transformers(family, family_dirs, references, tmp_path):
    d = family_dirs(family)
    missing = {"resid_mid"} if family in PARALLEL else set()
    comps = [c for c in COMPONENTS if c not in missing]
    model, info = load_engine(str(d), engine="native", components=comps, device="cpu")
    assert info["engine"] == "native" and set(model.components) == set(comps)
    assert info["attn_implementation"] in ("sdpa", "eager")
    _cache(model, info, tmp_path / "native.h5", comps, self_check=2)
    worst = _check_store(tmp_path / "native.h5", family, references(family), model.tokenizer, comps)
    with h5py.File(tmp_path / "native.h5") as f:
        assert f.attrs["self_check_max_diff"] < ATOL and f.attrs["engine"] == "native"
    for c in missing:  # refused by name, before any weight is loaded, by native and auto alike
        for engine in ("native", "auto"):
            with pytest.raises(
                LayerscopeError, match=f"component '{c}' is not available for architecture"
            ):
                load_engine(str(d), engine=engine, components=[c], device="cpu")
    _report("native", family, {**worst, **dict.fromkeys(missing, "refused")})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bridge_equals_transformers_or_is_refused(family, family_dirs, references, tmp_path):
    d = family_dirs(family)
    if family in BRIDGE_REFUSED:
        with pytest.raises(LayerscopeError, match=BRIDGE_REFUSED[family]):
            load_engine(str(d), engine="bridge", device="cpu")
        # auto takes the native engine, which is exact (test above)
        assert (
            load_engine(str(d), engine="auto", components=["resid_post"], device="cpu")[1]["engine"]
            == "native"
        )
        _report("bridge", family, dict.fromkeys(COMPONENTS, "refused"))
        return
    model, info = load_engine(str(d), engine="bridge", device="cpu")
    served = [c for c in COMPONENTS if f"blocks.0.hook_{c}" in model.hook_dict]
    assert {"resid_pre", "resid_post"} <= set(served)
    defined = [c for c in served if c in ("resid_pre", "resid_post") or c in DEFINITIONS[family]]
    wrong = BRIDGE_WRONG.get(family, set())
    comps = [c for c in defined if c not in wrong]
    _cache(model, info, tmp_path / "bridge.h5", comps, self_check=2)
    tok = getattr(model, "layerscope_tokenizer", model.tokenizer)
    worst = _check_store(
        tmp_path / "bridge.h5",
        family,
        references(family),
        tok,
        comps,
        identities=set(comps) >= set(DEFINITIONS[family]),
    )
    cells = dict(worst)
    # a component the bridge computes differently, or one without a definition here, is caught
    # by the self-check, never written unverified
    for c in sorted(wrong | (set(served) - set(defined))):
        expect = "differ from plain transformers" if c in wrong else "cannot verify"
        with pytest.raises(LayerscopeError, match=f"{c}.*{expect}|{expect} {c}"):
            _cache(model, info, tmp_path / f"bridge_{c}.h5", [c], self_check=1)
        cells[c] = "self-check refuses"
    _report("bridge", family, cells)


def test_auto_engine_choice(family_dirs):
    d = str(family_dirs("bloom"))
    # BLOOM's attention and MLP add the residual inside themselves; their output projections are
    # what is added, which the native engine reads
    assert load_engine(d, components=["attn_out"], device="cpu")[1]["engine"] == "native"
    # a component the native engine cannot tap is refused by name, not sent to the bridge
    gptj = str(family_dirs("gptj"))
    with pytest.raises(LayerscopeError, match="component 'resid_mid' is not available.*GPTJ"):
        load_engine(gptj, components=["resid_post", "resid_mid"], device="cpu")
    with pytest.raises(LayerscopeError, match="compatibility_mode"):
        load_engine(d, engine="native", compatibility_mode=True, device="cpu")
    with pytest.raises(LayerscopeError, match="engine 'fast' not understood"):
        load_engine(d, engine="fast", device="cpu")


@pytest.mark.parametrize("family", ["opt_post_ln", "bloom_post_ln"])
def test_post_norm_resid_mid_replacement_is_exact(family, family_dirs):
    """In post-norm layouts resid_mid is the output of the norm on the stream, which is both what
    the MLP reads and what it adds to: replacing it is the same as replacing that norm's output."""
    import torch

    d = str(family_dirs(family))
    model, _ = load_engine(d, engine="native", components=["resid_mid"], device="cpu")
    ids = torch.tensor([tokenize_prompts(model.tokenizer, TEXTS[:1], prepend_bos=True)[0]])
    with model.hooks([("blocks.0.hook_resid_mid", lambda x, hook=None: 1.5 * x)]):
        got = model(ids)
    norm = _module(model.layers[0], STREAM_NORMS[family]["attn"])
    handle = norm.register_forward_hook(lambda mod, a, o: 1.5 * o)
    try:
        want = model.model(input_ids=ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not torch.allclose(got, model(ids), atol=1e-3)
