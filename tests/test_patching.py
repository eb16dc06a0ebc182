"""Activation patching (layerscope.interventions.patching) on tiny offline GPT-2 and Qwen2
models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.engine.loading import load_model  # noqa: E402
from layerscope.engine.tokens import resolve_bos, tokenize_prompts  # noqa: E402
from layerscope.errors import InputError, LayerscopeError  # noqa: E402
from layerscope.interventions import patching as P  # noqa: E402
from layerscope.plotting import patching as PF  # noqa: E402

N_LAYERS = 2
N_HEADS = 4

PAIRS = [
    # clean / corrupted differ in one digit (the tiny tokenizer splits digits one per token)
    {
        "pair_id": "p1",
        "clean": "Which is larger: 847 or 839? Answer:",
        "corrupted": "Which is larger: 347 or 839? Answer:",
        "clean_answer": " 847",
        "corrupted_answer": " 839",
    },
    {
        "pair_id": "p2",
        "clean": "Which is larger: 12 or 71? Answer:",
        "corrupted": "Which is larger: 12 or 11? Answer:",
        "clean_answer": " 71",
        "corrupted_answer": " 12",
    },
    {
        "pair_id": "p3",
        "clean": "Which is larger: 25 or 19? Answer:",
        "corrupted": "Which is larger: 15 or 19? Answer:",
        "clean_answer": " 25",
        "corrupted_answer": " 19",
    },
]


def _sharpen(path, scale=10.0):
    """Scale every weight matrix so the random model's logit differences are O(0.1), not O(1e-4).

    Recovery divides by LD_clean - LD_corrupted; with the default 0.02 init that gap is ~1e-4
    and float32 rounding alone would move recovery by more than the tolerances below.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch in ("gpt2", "qwen2"):
        d = build_tiny_model(
            tmp_path_factory.mktemp(arch),
            arch,
            n_layers=N_LAYERS,
            d_model=32,
            n_heads=N_HEADS,
            seed=1,
        )
        _sharpen(d)
        bridge, info = load_model(str(d), device="cpu")
        out[arch] = (d, bridge, info)
    return out


@pytest.fixture(scope="module")
def gpt2(models):
    return models["gpt2"]


def _pairs(*ids):
    rows = [p for p in PAIRS if not ids or p["pair_id"] in ids]
    return pd.DataFrame(rows)


def _prepared(bridge, pair_id):
    prepend = resolve_bos(bridge.tokenizer, "auto")
    return P.prepare_pairs(bridge.tokenizer, _pairs(pair_id), prepend_bos=prepend)[0]


def _cell(df, component, layer, position, head=-1, metric="logit_diff", pair_id="p1"):
    m = df[
        (df.pair_id == pair_id)
        & (df.component == component)
        & (df.layer == layer)
        & (df.position == position)
        & (df["head"] == head)
        & (df.metric == metric)
    ]
    assert len(m) == 1, (component, layer, position, head, metric)
    return float(m["value"].iloc[0])


# ---------------------------------------------------------------------------------------------
# pairs and answer tokens


def test_answer_tokens_first_differing_token_with_shared_prefix(gpt2):
    _, bridge, _ = gpt2
    tok = bridge.tokenizer
    pp = _prepared(bridge, "p1")
    prompt_ids = tokenize_prompts(tok, [PAIRS[0]["clean"]], prepend_bos=True)[0]
    assert pp.clean_ids[0] == tok.bos_token_id
    # " 847" vs " 839": the answers share " " and "8" (both appended to the prompts); the
    # metric compares the first DIFFERING token, the second digit ("4" vs "3")
    assert tok.decode(pp.clean_ids[len(prompt_ids) :]) == " 8"
    assert tok.decode([pp.clean_answer_id]) == "4" and tok.decode([pp.corrupted_answer_id]) == "3"
    assert len(pp.answer_prefix_ids) == 2  # " " and "8"
    pp3 = _prepared(bridge, "p3")  # " 25" vs " 19": leading digit differs, prefix is the space
    assert tok.decode([pp3.clean_answer_id]) == "2" and tok.decode([pp3.corrupted_answer_id]) == "1"
    assert tok.decode(pp3.answer_prefix_ids) == " "
    assert pp3.diff_positions == [
        len(tokenize_prompts(tok, ["Which is larger: "], prepend_bos=True)[0])
    ]


def test_answers_sharing_every_token_are_an_error(gpt2):
    _, bridge, _ = gpt2
    df = pd.DataFrame([{**PAIRS[2], "pair_id": "same", "corrupted_answer": " 25"}])
    with pytest.raises(InputError, match="same.*share every token"):
        P.prepare_pairs(bridge.tokenizer, df, prepend_bos=True)


def test_unequal_length_pair_is_an_input_error(gpt2, tmp_path):
    _, bridge, _ = gpt2
    path = tmp_path / "pairs.csv"
    bad = {**PAIRS[0], "pair_id": "short_one", "corrupted": "Which is larger: 47 or 839? Answer:"}
    pd.DataFrame([PAIRS[1], bad]).to_csv(path, index=False)
    pairs = P.load_pairs(path)
    with pytest.raises(InputError) as exc:
        P.patch_sweep(bridge, pairs, components=("resid_post",))
    msg = str(exc.value)
    assert (
        "short_one" in msg and str(path) in msg and "line 3" in msg and "field 'corrupted'" in msg
    )
    n_clean = len(tokenize_prompts(bridge.tokenizer, [bad["clean"] + " 8"], prepend_bos=True)[0])
    assert f"clean {n_clean} tokens" in msg and f"corrupted {n_clean - 1} tokens" in msg


def test_load_pairs_keeps_spaces_and_names_file_line_field(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "pair_id,clean,corrupted,clean_answer,corrupted_answer\n"
        "a,Q 1?,Q 2?, 10, 20\n"
        "b,Q 3?,,  30, 40\n"
    )
    with pytest.raises(InputError, match=r"p\.csv, line 3: field 'corrupted': .*empty"):
        P.load_pairs(path)
    path.write_text(
        "pair_id,clean,corrupted,clean_answer,corrupted_answer\n"
        "a,Q 1?,Q 2?, 10, 20\na,Q 3?,Q 4?, 30, 40\n"
    )
    with pytest.raises(InputError, match=r"line 3: field 'pair_id': duplicate pair_id 'a'"):
        P.load_pairs(path)
    path.write_text("pair_id,clean,clean_answer,corrupted_answer\na,Q 1?, 10, 20\n")
    with pytest.raises(InputError, match="field 'corrupted': required column"):
        P.load_pairs(path)
    j = tmp_path / "p.jsonl"
    j.write_text(
        json.dumps(
            {
                "pair_id": "x",
                "clean": "Q 1?",
                "corrupted": "Q 2?",
                "clean_answer": " 10",
                "corrupted_answer": " 20",
            }
        )
        + "\n"
        + json.dumps({"pair_id": "y", "clean": "Q"})
        + "\n"
    )
    with pytest.raises(InputError, match=r"p\.jsonl, line 2: field 'corrupted': key is missing"):
        P.load_pairs(j)
    j.write_text(
        json.dumps(
            {
                "pair_id": "x",
                "clean": "Q 1?",
                "corrupted": "Q 2?",
                "clean_answer": " 10",
                "corrupted_answer": " 20",
            }
        )
        + "\n"
    )
    df = P.load_pairs(j)
    assert df["clean_answer"].tolist() == [" 10"] and df["source_line"].tolist() == [1]


def test_demo_pairs_file_loads(repo):
    df = P.load_pairs(repo / "demo" / "data" / "patching_pairs.csv")
    assert len(df) == 16 and df["clean_answer"].str.startswith(" ").all()


# ---------------------------------------------------------------------------------------------
# exact identities


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_last_layer_last_position_resid_post_recovers_fully(models, arch):
    _, bridge, _ = models[arch]
    res = P.patch_sweep(
        bridge,
        _pairs(),
        components=("resid_post",),
        layers=[N_LAYERS - 1],
        positions=1,
        heads=False,
    )
    rec = res.df[res.df.metric == "recovery"]
    assert len(rec) == len(PAIRS)
    assert np.allclose(rec["value"], 1.0, atol=1e-5)
    ld = res.df[res.df.metric == "logit_diff"].merge(res.pairs, on="pair_id")
    assert np.allclose(ld["value"], ld["clean_logit_diff_y"], atol=1e-5)
    gaps = (res.pairs.clean_logit_diff - res.pairs.corrupted_logit_diff).abs()
    assert (gaps > 1e-2).all()  # the identities below are not trivially 0/0


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_joint_patch_of_every_position_at_layer0_resid_pre_recovers_fully(models, arch):
    _, bridge, _ = models[arch]
    pp = _prepared(bridge, "p1")
    out = P.patch_cells(
        bridge,
        pp,
        [
            {"component": "resid_pre", "layer": 0, "positions": "all"},
            {"component": "resid_pre", "layer": 1, "positions": list(range(pp.n_tokens))},
            {"component": "resid_post", "layer": 0, "positions": "all"},
        ],
    )
    assert np.allclose(out["recovery"], 1.0, atol=1e-5)
    # a single position is not enough
    one = P.patch_cells(
        bridge, pp, [{"component": "resid_pre", "layer": 0, "positions": [pp.n_tokens - 1]}]
    )
    assert abs(one["recovery"].iloc[0] - 1.0) > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_patching_the_corrupted_activation_gives_zero(models, arch):
    _, bridge, _ = models[arch]
    pp = _prepared(bridge, "p2")
    cells = [
        {"component": c, "layer": L, "positions": [p]}
        for c in ("resid_pre", "attn_out", "mlp_out", "resid_post")
        for L in range(N_LAYERS)
        for p in (pp.diff_positions[0], pp.n_tokens - 1)
    ]
    cells += [
        {"component": "z", "layer": 1, "positions": [pp.n_tokens - 1], "head": h}
        for h in range(N_HEADS)
    ]
    cells += [{"component": "resid_pre", "layer": 0, "positions": "all"}]
    out = P.patch_cells(bridge, pp, cells, source="corrupted")
    assert np.allclose(out["recovery"], 0.0, atol=1e-5)
    # and in the sweep, cells before the first differing token are exactly the corrupted run
    res = P.patch_sweep(
        bridge, _pairs("p2"), components=("resid_pre", "mlp_out"), heads=False, skip_identical=False
    )
    early = res.df[(res.df.metric == "recovery") & (res.df.position < pp.diff_positions[0])]
    assert len(early) and np.allclose(early["value"], 0.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# against a hand-written hook loop on a plain transformers model (no TransformerLens)


def _modules(hf, arch, layer):
    if arch == "gpt2":
        blk = hf.transformer.h[layer]
        return blk, blk.attn, blk.mlp, blk.attn.c_proj
    blk = hf.model.layers[layer]
    return blk, blk.self_attn, blk.mlp, blk.self_attn.o_proj


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, new):
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    return new


def _hf_run(hf, arch, ids, cell=None, value=None, capture=None):
    """One forward pass of ``hf`` on ``ids``; optionally capture or overwrite one cell's activation.

    cell = (component, layer, positions, head). With ``capture`` (a dict) the activation is
    stored; with ``value`` it is written at the positions (and head) before use.
    """
    handles = []
    if cell is not None:
        comp, layer, positions, head = cell
        blk, attn, mlp, oproj = _modules(hf, arch, layer)

        def edit(t):
            if comp == "z":
                t4 = t.view(t.shape[0], t.shape[1], N_HEADS, -1).clone()
                if capture is not None:
                    capture["x"] = t4.clone()
                if value is not None:
                    sel = (
                        (slice(None), positions) if head is None else (slice(None), positions, head)
                    )
                    t4[(0,) + sel[1:]] = value[(0,) + sel[1:]]
                return t4.view_as(t)
            t = t.clone()
            if capture is not None:
                capture["x"] = t.clone()
            if value is not None:
                t[0, positions] = value[0, positions]
            return t

        if comp == "resid_pre":

            def pre(mod, args, kwargs):
                if args:
                    return (edit(args[0]),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = edit(kwargs["hidden_states"])
                return args, kwargs

            handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
        elif comp == "z":
            handles.append(
                oproj.register_forward_pre_hook(
                    lambda mod, args: (edit(args[0]),) + tuple(args[1:])
                )
            )
        else:
            mod = {"resid_post": blk, "attn_out": attn, "mlp_out": mlp}[comp]
            handles.append(
                mod.register_forward_hook(lambda m, a, out: _replace_first(out, edit(_first(out))))
            )
    try:
        with torch.inference_mode():
            logits = hf(input_ids=torch.tensor([ids])).logits
    finally:
        for h in handles:
            h.remove()
    return logits[0, -1].double()


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_sweep_matches_hand_written_hook_loop(models, arch):
    from transformers import AutoModelForCausalLM

    path, bridge, _ = models[arch]
    hf = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    pp = _prepared(bridge, "p1")
    res = P.patch_sweep(
        bridge,
        _pairs("p1"),
        heads=True,
        head_positions="positions",
        positions=[pp.diff_positions[0], -2, -1],
    )
    d = pp.diff_positions[0]
    last = pp.n_tokens - 1
    cells = [
        ("resid_pre", 1, d, None),
        ("attn_out", 0, last, None),
        ("mlp_out", 0, d, None),
        ("resid_post", 0, d, None),
        ("resid_post", 1, last - 1, None),
        ("z", 1, last, 2),
        ("z", 0, d, 0),
    ]

    def ld(logits):
        return float(logits[pp.clean_answer_id] - logits[pp.corrupted_answer_id])

    clean_ld = ld(_hf_run(hf, arch, pp.clean_ids))
    corr_ld = ld(_hf_run(hf, arch, pp.corrupted_ids))
    assert clean_ld == pytest.approx(float(res.pairs.clean_logit_diff[0]), abs=1e-4)
    assert corr_ld == pytest.approx(float(res.pairs.corrupted_logit_diff[0]), abs=1e-4)
    for comp, layer, pos, head in cells:
        cap: dict = {}
        _hf_run(hf, arch, pp.clean_ids, (comp, layer, [pos], head), capture=cap)
        patched = ld(
            _hf_run(hf, arch, pp.corrupted_ids, (comp, layer, [pos], head), value=cap["x"])
        )
        got = _cell(res.df, comp, layer, pos, -1 if head is None else head)
        assert got == pytest.approx(patched, abs=1e-4), (comp, layer, pos, head)
        rec = _cell(res.df, comp, layer, pos, -1 if head is None else head, metric="recovery")
        assert rec == pytest.approx((patched - corr_ld) / (clean_ld - corr_ld), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# batching


def test_batched_equals_unbatched(gpt2):
    _, bridge, _ = gpt2
    pairs = _pairs("p2", "p3")  # equal token lengths: patched rows of both pairs share batches
    kw = dict(
        components=("resid_pre", "attn_out", "mlp_out", "resid_post"), heads=True, positions=4
    )
    one = P.patch_sweep(bridge, pairs, batch_size=1, **kw)
    big = P.patch_sweep(bridge, pairs, batch_size=512, **kw)
    full = P.patch_sweep(bridge, pairs, batch_size=37, skip_identical=False, **kw)
    assert big.info["n_forward_passes"] < one.info["n_forward_passes"] / 10
    key = ["pair_id", "component", "layer", "position", "head", "metric"]
    a = one.df.sort_values(key).reset_index(drop=True)
    b = big.df.sort_values(key).reset_index(drop=True)
    c = full.df.sort_values(key).reset_index(drop=True)
    assert a[key].equals(b[key]) and a[key].equals(c[key])
    ld = a.metric == "logit_diff"
    assert np.allclose(a.value[ld], b.value[ld], atol=1e-5)
    assert np.allclose(a.value[ld], c.value[ld], atol=1e-5)
    assert np.allclose(a.value[~ld], b.value[~ld], atol=1e-4, equal_nan=True)
    assert full.info["n_skipped_identical"] == 0 and big.info["n_skipped_identical"] > 0
    assert set(a.pair_id) == {"p2", "p3"}
    assert sorted(a[a.component == "z"]["head"].unique()) == list(range(N_HEADS))
    assert (a[a.component != "z"]["head"] == -1).all()


# ---------------------------------------------------------------------------------------------
# heads, summary, files, figures


def test_heads_skipped_cleanly_without_hook_z(gpt2, monkeypatch):
    _, bridge, _ = gpt2
    monkeypatch.setattr(P, "heads_available", lambda b: False)
    res = P.patch_sweep(bridge, _pairs("p3"), components=("resid_post",), positions=1, heads=True)
    assert not res.heads and (res.df.component == "resid_post").all()
    assert any("hook_z" in n for n in res.notes)


def test_bad_settings(gpt2):
    _, bridge, _ = gpt2
    with pytest.raises(LayerscopeError, match="unknown component"):
        P.patch_sweep(bridge, _pairs("p3"), components=("resid_typo",))
    with pytest.raises(LayerscopeError, match="layers"):
        P.patch_sweep(bridge, _pairs("p3"), layers=[5])
    with pytest.raises(LayerscopeError, match="position 99"):
        P.patch_sweep(bridge, _pairs("p3"), positions=[99])


def test_summary_files_and_figures(gpt2, tmp_path):
    import h5py

    _, bridge, info = gpt2
    res = P.patch_sweep(bridge, _pairs(), heads=True, model_info=info)
    s = P.summarize(res.df, n_boot=200, seed=0)
    assert set(s.columns) >= {
        "n_tokens",
        "component",
        "layer",
        "head",
        "position",
        "token",
        "metric",
        "mean",
        "ci_low",
        "ci_high",
        "n_pairs",
    }
    ok = s.dropna(subset=["ci_low"])
    assert ((ok.ci_low <= ok["mean"] + 1e-9) & (ok["mean"] <= ok.ci_high + 1e-9)).all()
    assert sorted(s.n_tokens.unique()) == sorted(res.pairs.n_tokens.unique())
    pd.testing.assert_frame_equal(s, P.summarize(res.df, n_boot=200, seed=0))  # seeded
    # a cell's mean is the plain mean over the pairs of its length group
    g = res.pairs.n_tokens.max()
    ids = res.pairs.pair_id[res.pairs.n_tokens == g]
    sub = res.df[
        res.df.pair_id.isin(ids)
        & (res.df.component == "resid_pre")
        & (res.df.layer == 1)
        & (res.df.position == g - 1)
        & (res.df.metric == "logit_diff")
    ]
    row = s[
        (s.n_tokens == g)
        & (s.component == "resid_pre")
        & (s.layer == 1)
        & (s.position == g - 1)
        & (s.metric == "logit_diff")
    ]
    assert float(row["mean"].iloc[0]) == pytest.approx(sub.value.mean())

    csv, h5 = tmp_path / "out" / "patching.csv", tmp_path / "out" / "patching.h5"
    P.write_patching(res, csv, h5)
    back = pd.read_csv(csv, keep_default_na=False, dtype={"token": str, "pair_id": str})
    assert list(back.columns) == list(P.RESULT_COLUMNS) and len(back) == len(res.df)
    with h5py.File(h5, "r") as f:
        n_pairs, n_pos = len(PAIRS), int(res.pairs.n_tokens.max())
        assert f["recovery"].shape == (n_pairs, 4, N_LAYERS, n_pos)
        assert f["head_recovery"].shape == (n_pairs, N_LAYERS, N_HEADS, n_pos)
        assert [x.decode() for x in f["components"][:]] == list(res.components)
        i = [x.decode() for x in f["pair_id"][:]].index("p1")
        c = list(res.components).index("resid_post")
        T = int(f["n_tokens"][i])
        assert f["recovery"][i, c, N_LAYERS - 1, T - 1] == pytest.approx(1.0, abs=1e-5)
        assert f["tokens"][i, 0].decode() == res.tokens["p1"][0]
        assert f.attrs["prepend_bos"] and f.attrs["model"] == info["model"]

    labels = res.position_labels()
    assert any(lab.endswith("*") for lab in labels[g])
    figs = PF.plot_patching_heatmaps(
        s,
        labels,
        tmp_path / "fig" / "heat",
        model="tiny",
        experiment="test",
        formats=("png", "pdf"),
    )
    figs += PF.plot_head_heatmap(s, tmp_path / "fig" / "heads.png", model="tiny", experiment="test")
    assert sorted(p.name for p in figs) == ["heads.png", "heat.pdf", "heat.png"]
    assert all(p.stat().st_size > 1000 for p in figs)
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == [
        "heads.png",
        "heat.pdf",
        "heat.png",
    ]  # no temp files
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_native_engine_patches_heads_like_the_bridge(models, arch):
    """The workflow's exact sweep runs on the native engine, heads included (z read and replaced
    at the attention output projection's input): every cell equals the bridge's sweep, whose cells
    equal the hand-written hook loop above."""
    from layerscope.engine.native import load_native

    path, bridge, _ = models[arch]
    native = load_native(str(path), dtype=torch.float32, device="cpu")
    assert "blocks.1.attn.hook_z" in native.hook_dict and native.cfg.n_heads == N_HEADS
    ids = torch.tensor([_prepared(bridge, "p1").clean_ids])
    got = {}
    for name, eng in (("bridge", bridge), ("native", native)):

        def keep(z, hook, name=name):
            got[name] = z

        with eng.hooks(fwd_hooks=[("blocks.1.attn.hook_z", keep)]):
            eng(ids)
    assert got["native"].shape == got["bridge"].shape == (1, ids.shape[1], N_HEADS, 8)
    assert torch.allclose(got["native"], got["bridge"], atol=1e-5)
    kw = dict(heads=True, head_positions="positions", positions="all", batch_size=16)
    a = P.patch_sweep(bridge, _pairs("p1", "p3"), **kw).df
    b = P.patch_sweep(native, _pairs("p1", "p3"), **kw).df
    key = ["pair_id", "component", "layer", "position", "head", "metric"]
    a, b = (x.sort_values(key).reset_index(drop=True) for x in (a, b))
    assert a[key].equals(b[key]) and (a.component == "z").sum() > 0
    ld = a.metric == "logit_diff"
    assert np.allclose(a.value[ld], b.value[ld], atol=1e-4)
    assert np.allclose(a.value[~ld], b.value[~ld], atol=1e-3, equal_nan=True)
