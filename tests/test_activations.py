"""cache_store / extract_layer on tiny GPT-2 and Qwen2 models, checked against plain
transformers."""

from __future__ import annotations

import types

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.data.h5cache import read_layer, read_layers, read_tokens  # noqa: E402
from layerscope.engine.loading import load_model  # noqa: E402
from layerscope.engine.store import cache_from_table, cache_store, extract_layer  # noqa: E402
from layerscope.engine.tokens import make_batches, resolve_bos, tokenize_prompts  # noqa: E402
from layerscope.errors import LayerscopeError  # noqa: E402

COMPONENTS = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
POOLINGS = ["mean", "last", "max"]
ARCHS = ["gpt2", "qwen2"]
N_LAYERS = 3

LONG = (
    "The capital of France is Paris and the Eiffel Tower is located in Paris while the quick "
    "brown fox jumps over the lazy dog again and again; which is larger: 847 or 839? Answer: 847 "
    "and the sum of 25 and 9 is 34 and the product of 42 and 11 is 462 so that is the answer"
)
TEXTS = [
    "Paris",
    LONG,
    "Which is larger: 12 or 71?",
    "the quick brown fox",
    LONG[:90],
    "847",
    "Answer minimally: Given the numbers 25 and 9 calculate the sum",
]
PIDS = [f"q{i:02d}" for i in range(len(TEXTS))]
LABELS = ["a", "b", "a", "b", "a", "b", "a"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {
        arch: build_tiny_model(
            root / arch, arch, n_layers=N_LAYERS, d_model=32, n_heads=4, n_positions=256
        )
        for arch in ARCHS
    }
    out["qwen2_28"] = build_tiny_model(
        root / "qwen2_28", "qwen2", n_layers=28, d_model=32, n_heads=4, d_mlp=64, n_positions=256
    )
    return out


@pytest.fixture(scope="session")
def bridges(models):
    return {arch: load_model(str(models[arch]), device="cpu") for arch in ARCHS}


@pytest.fixture(scope="session")
def stores(bridges, tmp_path_factory):
    """Every component x pooling, token-level layer 1, batch_size smaller than n (session
    cached)."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for arch, (bridge, info) in bridges.items():
        path = root / f"{arch}.h5"
        cache_store(
            bridge,
            PIDS,
            TEXTS,
            LABELS,
            path,
            components=COMPONENTS,
            poolings=POOLINGS,
            token_level_layers=[1],
            batch_size=3,
            model_info=info,
            log=None,
        )
        out[arch] = path
    return out


def _hf_reference(model_dir, arch, token_ids):
    """Per-token activations of one unpadded prompt from plain transformers: {(component, layer):
    [T, d]}."""
    from transformers import AutoModelForCausalLM

    ref_key = (str(model_dir), tuple(token_ids))
    if ref_key in _REF_CACHE:
        return _REF_CACHE[ref_key]
    key = (str(model_dir), arch)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model = _HF_CACHE[key]
    blocks = model.transformer.h if arch == "gpt2" else model.model.layers
    grabbed = {}

    def grab(name, layer):
        def hook(module, args, output):
            grabbed[(name, layer)] = (
                (output[0] if isinstance(output, tuple) else output)[0].detach().clone()
            )

        return hook

    handles = []
    for L, block in enumerate(blocks):
        attn = block.attn if arch == "gpt2" else block.self_attn
        handles.append(attn.register_forward_hook(grab("attn_out", L)))
        handles.append(block.mlp.register_forward_hook(grab("mlp_out", L)))
        handles.append(block.register_forward_hook(grab("resid_post", L)))
    try:
        with torch.no_grad():
            out = model(torch.tensor([token_ids]), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    ref = {}
    for L in range(len(blocks)):
        ref[("resid_pre", L)] = hs[L][0]
        ref[("attn_out", L)] = grabbed[("attn_out", L)]
        ref[("mlp_out", L)] = grabbed[("mlp_out", L)]
        ref[("resid_mid", L)] = hs[L][0] + grabbed[("attn_out", L)]
        ref[("resid_post", L)] = grabbed[("resid_post", L)]
        if L + 1 < len(blocks):  # the last hidden state has the final norm applied
            torch.testing.assert_close(hs[L + 1][0], grabbed[("resid_post", L)])
    _REF_CACHE[ref_key] = ref
    return ref


_HF_CACHE: dict = {}
_REF_CACHE: dict = {}


def _pool(x, pooling):
    x = x.double()
    return {"mean": x.mean(0), "last": x[-1], "max": x.max(0).values}[pooling].numpy()


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_component_and_pooling_matches_plain_transformers(arch, models, bridges, stores):
    bridge, _ = bridges[arch]
    ids = tokenize_prompts(bridge.tokenizer, TEXTS, prepend_bos=True)
    with h5py.File(stores[arch]) as f:
        assert [p.decode() for p in f["prompt_id"][:]] == PIDS
        assert (
            f.attrs["complete"] and f.attrs["prepend_bos"] and f.attrs["exclude_bos_from_pooling"]
        )
        for i, tok in enumerate(ids):
            ref = _hf_reference(models[arch], arch, tok)
            for comp in COMPONENTS:
                for L in range(N_LAYERS):
                    pooled_tokens = ref[(comp, L)][1:]  # BOS left out
                    for pooling in POOLINGS:
                        got = f[f"{comp}/{pooling}"][L, i]
                        np.testing.assert_allclose(
                            got,
                            _pool(pooled_tokens, pooling),
                            atol=1e-4,
                            rtol=0,
                            err_msg=f"{arch} {comp} L{L} {pooling} prompt {i}",
                        )


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_equals_one_prompt_at_a_time(arch, bridges, stores, tmp_path):
    bridge, info = bridges[arch]
    lengths = [len(x) for x in tokenize_prompts(bridge.tokenizer, TEXTS, prepend_bos=True)]
    assert max(lengths) >= 40 and min(lengths) <= 3  # very different lengths in one batch
    single = tmp_path / "single.h5"
    cache_store(
        bridge,
        PIDS,
        TEXTS,
        LABELS,
        single,
        components=COMPONENTS,
        poolings=POOLINGS,
        token_level_layers=[1],
        batch_size=1,
        model_info=info,
        log=None,
    )
    budget = tmp_path / "budget.h5"  # token-budget batching: different groupings again
    cache_store(
        bridge,
        PIDS,
        TEXTS,
        LABELS,
        budget,
        components=COMPONENTS,
        poolings=POOLINGS,
        batch_size=4,
        max_tokens_per_batch=60,
        model_info=info,
        log=None,
    )
    with h5py.File(stores[arch]) as a, h5py.File(single) as b, h5py.File(budget) as c:
        for comp in COMPONENTS:
            for pooling in POOLINGS:
                np.testing.assert_allclose(
                    a[f"{comp}/{pooling}"][()], b[f"{comp}/{pooling}"][()], atol=1e-5, rtol=0
                )
                np.testing.assert_allclose(
                    c[f"{comp}/{pooling}"][()], b[f"{comp}/{pooling}"][()], atol=1e-5, rtol=0
                )
            np.testing.assert_allclose(
                a[f"{comp}/none/values"][()], b[f"{comp}/none/values"][()], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("arch", ARCHS)
def test_token_level_none_pooling_is_every_real_token(arch, models, bridges, stores, tmp_path):
    bridge, _ = bridges[arch]
    ids = tokenize_prompts(bridge.tokenizer, TEXTS, prepend_bos=True)
    out = extract_layer(stores[arch], 1, tmp_path / "layer_1.h5")
    for comp in COMPONENTS:
        tk = read_tokens(out, comp)
        assert tk.prompt_ids == PIDS
        np.testing.assert_array_equal(
            tk.offsets, np.concatenate([[0], np.cumsum([len(x) - 1 for x in ids])])
        )
        for i, tok in enumerate(ids):
            np.testing.assert_array_equal(tk.prompt_token_ids(i), tok[1:])
            ref = _hf_reference(models[arch], arch, tok)[(comp, 1)][1:].numpy()
            np.testing.assert_allclose(tk.prompt(i), ref, atol=1e-4, rtol=0)
    # layer 0 was not asked for at token level
    with pytest.raises(LayerscopeError, match="token-level"):
        read_tokens(extract_layer(stores[arch], 0, tmp_path / "layer_0.h5"), "resid_post")


def test_bos_policy_and_no_double_bos(bridges, models, tmp_path):
    bridge, info = bridges["gpt2"]
    tok = bridge.tokenizer
    bos = tok.bos_token_id
    assert (
        resolve_bos(tok, "auto") is True
        and resolve_bos(tok, False) is False
        and resolve_bos(tok, "true")
    )
    with_bos = tokenize_prompts(
        tok, ["hello world", tok.bos_token + "hello world"], prepend_bos=True
    )
    assert with_bos[0][0] == bos and with_bos[0][1] != bos
    assert with_bos[1] == with_bos[0]  # never a second BOS
    without = tokenize_prompts(tok, ["hello world"], prepend_bos=False)
    assert without[0] == with_bos[0][1:]
    assert tokenize_prompts(tok, [""], prepend_bos=True) == [[bos]]

    # bos kept in the pool: mean over all tokens, BOS included; bos false: no BOS fed at all
    texts, pids = TEXTS[:3], PIDS[:3]
    inc = tmp_path / "inc.h5"
    nob = tmp_path / "nob.h5"
    cache_store(
        bridge,
        pids,
        texts,
        LABELS[:3],
        inc,
        poolings=["mean"],
        exclude_bos_from_pooling=False,
        model_info=info,
        log=None,
    )
    cache_store(
        bridge,
        pids,
        texts,
        LABELS[:3],
        nob,
        poolings=["mean"],
        prepend_bos=False,
        model_info=info,
        log=None,
    )
    with h5py.File(inc) as a, h5py.File(nob) as b:
        assert a.attrs["prepend_bos"] and not a.attrs["exclude_bos_from_pooling"]
        assert not b.attrs["prepend_bos"] and b.attrs["bos"] == "false"
        for i, text in enumerate(texts):
            t_bos = tokenize_prompts(tok, [text], prepend_bos=True)[0]
            ref = _hf_reference(models["gpt2"], "gpt2", t_bos)[("resid_post", 2)]
            np.testing.assert_allclose(
                a["resid_post/mean"][2, i], _pool(ref, "mean"), atol=1e-4, rtol=0
            )
            ref = _hf_reference(models["gpt2"], "gpt2", t_bos[1:])[("resid_post", 2)]
            np.testing.assert_allclose(
                b["resid_post/mean"][2, i], _pool(ref, "mean"), atol=1e-4, rtol=0
            )
            assert b["n_tokens"][i] == len(t_bos) - 1


def test_28_layer_model_four_layer_files(models, tmp_path):
    bridge, info = load_model(str(models["qwen2_28"]), device="cpu")
    assert (
        info["n_layers"] == 28
        and info["d_model"] == 32
        and info["architecture"] == "Qwen2ForCausalLM"
    )
    store = tmp_path / "store.h5"
    cache_store(
        bridge,
        PIDS,
        TEXTS,
        LABELS,
        store,
        components=["resid_post", "mlp_out"],
        poolings=["mean", "last"],
        token_level_layers=[12],
        batch_size=4,
        model_info=info,
        log=None,
    )
    paths = [extract_layer(store, L, tmp_path / f"layer_{L}.h5") for L in (6, 12, 18, 24)]
    for L, p in zip((6, 12, 18, 24), paths):
        with h5py.File(p) as f:
            assert set(f) >= {"prompt_id", "label", "resid_post", "mlp_out"}
            assert f["resid_post/mean"].shape == (len(TEXTS), 32)
            assert f["mlp_out/last"].shape == (len(TEXTS), 32)
            assert (
                f.attrs["layer"] == L and f.attrs["n_layers"] == 28 and f.attrs["kind"] == "layer"
            )
            assert ("none" in f["resid_post"]) == (L == 12)
        d = read_layer(p, "mlp_out", "last")
        assert d.layer == L and d.prompt_ids == PIDS and d.labels == LABELS
        assert d.attrs["hook_names"] == [f"blocks.{L}.hook_resid_post", f"blocks.{L}.hook_mlp_out"]
        assert (
            d.attrs["model"] == str(models["qwen2_28"]) and d.attrs["compatibility_mode"] is False
        )
        assert d.attrs["transformer_lens_version"] and d.attrs["layerscope_version"]
        with h5py.File(store) as f:
            np.testing.assert_array_equal(d.X, f["mlp_out/last"][L])
    stack = read_layers(paths, "resid_post", "mean", stack=True)
    assert stack.X.shape == (4, len(TEXTS), 32) and stack.layers == [6, 12, 18, 24]
    assert read_tokens(paths[1], "mlp_out").values.shape == (
        sum(read_tokens(paths[1]).offsets[1:] - read_tokens(paths[1]).offsets[:-1]),
        32,
    )


def test_zero_token_prompt_is_named_and_nothing_is_written(bridges, tmp_path):
    bridge, info = bridges["gpt2"]
    out = tmp_path / "store.h5"
    with pytest.raises(LayerscopeError, match="q_empty"):
        cache_store(
            bridge, ["q_ok", "q_empty"], ["hello", ""], ["a", "b"], out, model_info=info, log=None
        )
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # without BOS exclusion the lone BOS is a token to pool
    cache_store(
        bridge,
        ["q_ok", "q_empty"],
        ["hello", ""],
        ["a", "b"],
        out,
        exclude_bos_from_pooling=False,
        model_info=info,
        log=None,
    )
    assert out.exists()


def test_caching_refuses_to_start_without_disk_space(bridges, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    bridge, info = bridges["gpt2"]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 9 << 20, 1 << 20))
    out = tmp_path / "results" / "store.h5"
    with pytest.raises(
        LayerscopeError,
        match=r"not enough free space in .*results for the activation store .*"
        r"needs ~2\.\d MiB \(estimated\), 1\.0 MiB free",
    ):
        cache_store(bridge, PIDS, TEXTS, LABELS, out, model_info=info, log=None)
    assert not out.parent.exists()  # refused before anything was created


def test_non_finite_values_name_layer_and_prompt(bridges, tmp_path):
    bridge, info = bridges["qwen2"]

    def poison(tensor, hook):
        if tensor.shape[1] > 30:  # only the long prompt (batch_size=1)
            tensor = tensor.clone()
            tensor[0, 5, 3] = float("inf")
            return tensor
        return None

    with bridge.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", poison)]):
        with pytest.raises(LayerscopeError, match=r"non-finite.*layer\(s\) \[1, 2\].*q01") as exc:
            cache_store(
                bridge,
                PIDS[:3],
                TEXTS[:3],
                LABELS[:3],
                tmp_path / "s.h5",
                components=["resid_pre"],
                poolings=["mean"],
                batch_size=1,
                model_info=info,
                log=None,
            )
    assert "q00" not in str(exc.value)
    assert not (tmp_path / "s.h5").exists()


def test_float16_overflow_stops_with_layers_prompts_and_the_fix(models, tmp_path):
    """A real float16 model whose layer-1 MLP overflows (|x| > 65504): inf in layers 1 and 2
    only."""
    from transformers import AutoModelForCausalLM

    model_dir = tmp_path / "hot"
    hf = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight.mul_(1e3)
        hf.transformer.h[1].mlp.c_proj.weight.mul_(1e5)
    hf.save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models["gpt2"] / name).exists():
            (model_dir / name).write_bytes((models["gpt2"] / name).read_bytes())
    bridge, info = load_model(str(model_dir), dtype="float16", device="cpu")
    out = tmp_path / "s.h5"
    with pytest.raises(
        LayerscopeError,
        match=r"non-finite activations \(inf/NaN\) in resid_post/mean at layer\(s\) "
        r"\[1, 2\] for prompt\(s\) q00, q01.*float16.*bfloat16 or float32",
    ):
        cache_store(bridge, PIDS[:3], TEXTS[:3], LABELS[:3], out, model_info=info, log=None)
    assert not out.exists() and not list(tmp_path.glob(".s.h5.*"))
    # The same weights in float32 do not overflow: the error is about the dtype, not the model.
    bridge32, info32 = load_model(str(model_dir), dtype="float32", device="cpu")
    cache_store(bridge32, PIDS[:3], TEXTS[:3], LABELS[:3], out, model_info=info32, log=None)
    assert out.exists()


def test_input_errors(bridges, tmp_path):
    bridge, info = bridges["gpt2"]
    out = tmp_path / "s.h5"
    with pytest.raises(LayerscopeError, match="duplicate prompt_id"):
        cache_store(bridge, ["a", "a"], ["x", "y"], ["0", "1"], out, model_info=info, log=None)
    with pytest.raises(LayerscopeError, match="token_level_layers"):
        cache_store(
            bridge, ["a"], ["x"], ["0"], out, token_level_layers=[7], model_info=info, log=None
        )
    with pytest.raises(LayerscopeError, match="token_level_layers"):
        cache_store(bridge, ["a"], ["x"], ["0"], out, poolings=["none"], model_info=info, log=None)
    with pytest.raises(LayerscopeError, match="longer than the model context"):
        cache_store(
            bridge, ["a", "b"], ["x", "word " * 400], ["0", "1"], out, model_info=info, log=None
        )
    with pytest.raises(LayerscopeError, match="same length"):
        cache_store(bridge, ["a", "b"], ["x"], ["0", "1"], out, model_info=info, log=None)
    # an architecture without resid_mid (parallel attention) gets a clear error before any work
    fake = types.SimpleNamespace(
        cfg=types.SimpleNamespace(n_layers=2, d_model=4),
        hook_dict={"blocks.0.hook_resid_post": None},
        tokenizer=bridge.tokenizer,
    )
    with pytest.raises(LayerscopeError, match="resid_mid.*not available"):
        cache_store(
            fake,
            ["a"],
            ["x"],
            ["0"],
            out,
            components=["resid_mid"],
            model_info={"architecture": "X"},
            log=None,
        )
    assert not out.exists()


def test_make_batches_sorted_and_bounded():
    lengths = [5, 40, 3, 12, 40, 7, 1]
    batches = make_batches(lengths, batch_size=3, max_tokens_per_batch=90)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert b == sorted(b) and len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 90
    assert set(batches[0]) == {1, 4}  # longest first
    with pytest.raises(LayerscopeError):
        make_batches(lengths, batch_size=0)


def test_progress_log_and_cache_from_table(models, tmp_path):
    table = tmp_path / "prompts.csv"
    import pandas as pd

    pd.DataFrame(
        {"prompt_id": PIDS, "text": TEXTS, "label": LABELS, "group": list("xxyyzzw")}
    ).to_csv(table, index=False)
    lines: list[str] = []
    summary = cache_from_table(
        table,
        tmp_path / "store.h5",
        model={
            "source": str(models["gpt2"]),
            "revision": None,
            "dtype": "float32",
            "compatibility_mode": False,
            "bos": "auto",
        },
        activations={
            "components": ["resid_post", "attn_out"],
            "poolings": ["mean", "last"],
            "exclude_bos_from_pooling": True,
            "token_level_layers": [2],
            "compression": "gzip",
            "out_dtype": "float16",
        },
        batch_size=2,
        device="cpu",
        threads=None,
        log=lines.append,
    )
    assert summary["n_prompts"] == len(TEXTS)
    assert any(
        f"{len(TEXTS)}/{len(TEXTS)} prompts" in line and "tokens/s" in line for line in lines
    )
    p = extract_layer(tmp_path / "store.h5", 2, tmp_path / "layer_2.h5")
    d = read_layer(p, "attn_out", "last")
    assert d.X.dtype == np.float16 and d.groups == list("xxyyzzw") and d.attrs["bos"] == "auto"
    with h5py.File(p) as f:
        assert f["resid_post/mean"].compression == "gzip"
    assert read_tokens(p, "attn_out").values.dtype == np.float16
