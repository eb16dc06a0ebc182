"""The architecture matrix: every family and layout users run, as a tiny random model with every
weight, bias and norm perturbed and small sliding windows, cached through layerscope and compared
with plain ``transformers`` (one prompt at a time, no padding).

Independent of the engine's tap table: resid_pre comes from ``output_hidden_states`` and resid_post
from forward hooks on the decoder layers; attn_out / resid_mid / mlp_out must add up to them token
by
token (``pre + attn + mlp == post``, ``pre + attn == mid``), and every pooling must be the pooling
of
the stored per-token values. A family is either exact within 1e-4 or refused by a LayerscopeError
that
names the component or the architecture.
"""

from __future__ import annotations

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
#: Layouts without a module for a component (the rest must support all five).
EXPECTED_MISSING = {
    "phi": {"resid_mid"},
    "gptj": {"resid_mid"},
    "gpt_neox": {"resid_mid"},
    "stablelm_parallel": {"resid_mid"},
    "falcon_new_decoder": {"resid_mid"},
    "falcon_parallel": {"resid_mid"},
    "falcon_parallel_alibi": {"resid_mid"},
    "bloom": {"attn_out", "mlp_out"},
    "opt_post_ln": {"attn_out", "mlp_out", "resid_mid"},
}
#: Layouts the TransformerBridge 4.3 gets wrong or cannot boot: refused by name.
BRIDGE_REFUSED = {
    "falcon_new_decoder": "new_decoder_architecture",
    "falcon_sequential_alibi": "ALiBi",
    "falcon_parallel_alibi": "ALiBi",
}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda fam: (
        build_family_model(root / fam, fam) if not (root / fam).exists() else root / fam
    )


def _reference(model_dir, token_ids):
    """{(component, layer): [T, d] float64} for resid_pre / resid_post from plain transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = next(
        m
        for m in hf.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == hf.config.num_hidden_layers
    )
    out = {}
    for ids in token_ids:
        post = {}
        handles = [
            layer.register_forward_hook(
                lambda mod, a, o, L=L: post.__setitem__(  # noqa: B023 (called in this pass)
                    L, (o[0] if isinstance(o, tuple) else o)[0].double().numpy()
                )
            )
            for L, layer in enumerate(layers)
        ]
        with torch.no_grad():
            res = hf(torch.tensor([ids]), output_hidden_states=True)
        for h in handles:
            h.remove()
        per = {("resid_post", L): post[L] for L in post}
        per.update(
            {("resid_pre", L): res.hidden_states[L][0].double().numpy() for L in range(len(layers))}
        )
        out[tuple(ids)] = per
    return out


def _pool(x, pooling):
    return {"mean": x.mean(0), "last": x[-1], "max": x.max(0)}[pooling]


def _cache(model, info, path, comps):
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
    )


def _check_store(path, model_dir, tokenizer, comps):
    ids = tokenize_prompts(tokenizer, TEXTS, prepend_bos=resolve_bos(tokenizer, "auto"))
    ref = _reference(model_dir, ids)
    with h5py.File(path) as f:
        skip = int(bool(f.attrs["prepend_bos"]) and bool(f.attrs["exclude_bos_from_pooling"]))
        offsets = f[f"{comps[0]}/none/offsets"][()]
        tok = {(c, L): f[f"{c}/none/values"][L].astype(np.float64) for c in comps for L in (0, 1)}
        pooled = {(c, p): f[f"{c}/{p}"][()].astype(np.float64) for c in comps for p in POOLINGS}
    for i, t in enumerate(ids):
        r = ref[tuple(t)]
        for L in (0, 1):
            got = {c: tok[(c, L)][offsets[i] : offsets[i + 1]] for c in comps}
            for c in ("resid_pre", "resid_post"):
                np.testing.assert_allclose(
                    got[c], r[(c, L)][skip:], atol=ATOL, rtol=0, err_msg=f"{c} L{L} p{i}"
                )
            if "attn_out" in got and "mlp_out" in got:
                np.testing.assert_allclose(
                    got["resid_pre"] + got["attn_out"] + got["mlp_out"],
                    got["resid_post"],
                    atol=ATOL,
                    rtol=0,
                    err_msg=f"pre+attn+mlp != post, L{L} p{i}",
                )
                assert np.abs(got["attn_out"]).max() > 1e-3 and np.abs(got["mlp_out"]).max() > 1e-3
            if "resid_mid" in got and "attn_out" in got:
                np.testing.assert_allclose(
                    got["resid_pre"] + got["attn_out"],
                    got["resid_mid"],
                    atol=ATOL,
                    rtol=0,
                    err_msg=f"pre+attn != mid, L{L} p{i}",
                )
            for c in comps:
                for p in POOLINGS:
                    np.testing.assert_allclose(
                        pooled[(c, p)][L, i],
                        _pool(got[c], p),
                        atol=ATOL,
                        rtol=0,
                        err_msg=f"{c}/{p} L{L} p{i}",
                    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_native_engine_equals_transformers(family, family_dirs, tmp_path):
    d = family_dirs(family)
    missing = EXPECTED_MISSING.get(family, set())
    comps = [c for c in COMPONENTS if c not in missing]
    model, info = load_engine(str(d), engine="native", components=comps, device="cpu")
    assert info["engine"] == "native" and set(model.components) == set(comps)
    assert info["attn_implementation"] in ("sdpa", "eager")
    _cache(model, info, tmp_path / "native.h5", comps)
    _check_store(tmp_path / "native.h5", d, model.tokenizer, comps)
    with h5py.File(tmp_path / "native.h5") as f:
        assert f.attrs["self_check_max_diff"] < ATOL and f.attrs["engine"] == "native"
    for c in missing:  # refused by name, before any weight is loaded
        with pytest.raises(
            LayerscopeError, match=f"component '{c}' is not available for architecture"
        ):
            load_engine(str(d), engine="native", components=[c], device="cpu")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bridge_equals_transformers_or_is_refused(family, family_dirs, tmp_path):
    d = family_dirs(family)
    if family in BRIDGE_REFUSED:
        with pytest.raises(LayerscopeError, match=BRIDGE_REFUSED[family]):
            load_engine(str(d), engine="bridge", device="cpu")
        # auto takes the native engine, which is exact (test above)
        assert (
            load_engine(str(d), engine="auto", components=["resid_post"], device="cpu")[1]["engine"]
            == "native"
        )
        return
    model, info = load_engine(str(d), engine="bridge", device="cpu")
    comps = [c for c in COMPONENTS if f"blocks.0.hook_{c}" in model.hook_dict]
    assert {"resid_pre", "resid_post"} <= set(comps)
    _cache(model, info, tmp_path / "bridge.h5", comps)
    tok = getattr(model, "layerscope_tokenizer", model.tokenizer)
    _check_store(
        tmp_path / "bridge.h5", d, tok, [c for c in comps if c in ("resid_pre", "resid_post")]
    )


def test_auto_engine_choice(family_dirs):
    d = str(family_dirs("bloom"))
    assert load_engine(d, components=["resid_post"], device="cpu")[1]["engine"] == "native"
    # BLOOM's attention adds the residual inside its module: auto falls back to the bridge for
    # attn_out
    logs = []
    model, info = load_engine(d, components=["attn_out"], device="cpu", log=logs.append)
    assert info["engine"] == "bridge" and "attn_out" in logs[0] and "BloomForCausalLM" in logs[0]
    with pytest.raises(LayerscopeError, match="compatibility_mode"):
        load_engine(d, engine="native", compatibility_mode=True, device="cpu")
    with pytest.raises(LayerscopeError, match="engine 'fast' not understood"):
        load_engine(d, engine="fast", device="cpu")
