"""Attribution patching (layerscope.interventions.attribution) and the screen
(layerscope.interventions.screen) on tiny offline GPT-2 models: against exact patching by
independent hook loops, finite differences, and the exact sweep itself."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.engine.loading import load_engine  # noqa: E402
from layerscope.engine.tokens import resolve_bos  # noqa: E402
from layerscope.errors import InputError, LayerscopeError  # noqa: E402
from layerscope.interventions import attribution as A  # noqa: E402
from layerscope.interventions import patching as P  # noqa: E402
from layerscope.interventions import screen as S  # noqa: E402

N_HEADS = 4
PAIRS = pd.DataFrame(
    [
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
)


def _sharpen(path, scale=10.0, attn_only=False):
    """Scale the weight matrices so logit differences are O(0.1) (see test_patching); with
    ``attn_only`` the MLPs are zeroed (an attention-only model)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(scale)
            if attn_only and ".mlp." in name:
                p.zero_()
    model.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = build_tiny_model(
        tmp_path_factory.mktemp("gpt2"), "gpt2", n_layers=2, d_model=32, n_heads=N_HEADS, seed=1
    )
    _sharpen(d)
    return d


@pytest.fixture(scope="module")
def native(model_dir):
    return load_engine(str(model_dir), engine="native")[0]


@pytest.fixture(scope="module")
def bridge(model_dir):
    return load_engine(str(model_dir), engine="bridge")[0]


@pytest.fixture
def linear64(model_dir):
    """The model in float64 with its final LayerNorm removed: LD is then linear in the last
    layer's resid_post, mlp_out and head z (a fresh engine: the test changes the model)."""
    eng = load_engine(str(model_dir), engine="native")[0]
    eng.model.double()
    eng.model.transformer.ln_f = torch.nn.Identity()
    return eng


def _prepared(engine, df=PAIRS):
    return P.prepare_pairs(engine.tokenizer, df, prepend_bos=resolve_bos(engine.tokenizer, "auto"))


def _ld_with(engine, pp, hooks=(), pre=()):
    """LD of the corrupted prompt with TL-named ``hooks`` and module forward ``pre``-hooks:
    an independent hook loop, one run per patch."""
    ids = torch.tensor([pp.corrupted_ids])
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre]
    try:
        with torch.no_grad(), engine.hooks(fwd_hooks=list(hooks)):
            logits = engine(ids, attention_mask=torch.ones_like(ids))[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    return float(logits[pp.clean_answer_id] - logits[pp.corrupted_answer_id])


def _clean_act(engine, pp, name, side="clean_ids"):
    """The activation at hook ``name`` of the clean (or, with ``side``, corrupted) prompt."""
    box = {}

    def grab(x, hook=None):
        box["x"] = x.detach().clone()

    ids = torch.tensor([getattr(pp, side)])
    with torch.no_grad(), engine.hooks(fwd_hooks=[(name, grab)]):
        engine(ids, attention_mask=torch.ones_like(ids))
    return box["x"]


def _patch_at(clean, p):
    def fn(x, hook=None):
        out = x.clone()
        out[:, p] = clean[:, p].to(out.dtype)
        return out

    return fn


# ---------------------------------------------------------------------------------------------
# the estimate against exact patching


@pytest.mark.parametrize("component", ["mlp_out", "resid_post"])
def test_attribution_equals_exact_where_the_metric_is_linear(linear64, component):
    """No final norm: LD is linear in the last layer's output, so AtP is exact there."""
    res = A.attribute(linear64, PAIRS, components=[component], heads=False)
    L = linear64.cfg.n_layers - 1
    name = f"blocks.{L}.hook_{component}"
    for i, pp in enumerate(_prepared(linear64)):
        base = _ld_with(linear64, pp)
        clean = _clean_act(linear64, pp, name)
        exact = [_ld_with(linear64, pp, [(name, _patch_at(clean, p))]) - base for p in range(5)]
        exact += [_ld_with(linear64, pp, [(name, _patch_at(clean, pp.n_tokens - 1))]) - base]
        est = list(res.scores[component][i, L, :5]) + [res.scores[component][i, L, pp.n_tokens - 1]]
        assert np.allclose(est, exact, rtol=1e-8, atol=1e-9)
        assert np.abs(exact).max() > 1e-3  # the check is not vacuous


def test_native_z_is_the_bridge_hook_z(native, bridge):
    """The per-head tap on the native engine reads the same values as the bridge's hook_z that
    the exact sweep patches."""
    pp = _prepared(native)[0]
    ids = torch.tensor([pp.clean_ids])
    box = {}
    proj = A.head_taps(native, 1)[1]
    h = proj.register_forward_pre_hook(lambda m, a: box.setdefault("z", a[0].detach().clone()))
    with torch.no_grad():
        native(ids, attention_mask=torch.ones_like(ids))
    h.remove()
    _, cache = bridge.run_with_cache(ids, names_filter=["blocks.1.attn.hook_z"])
    tl = cache["blocks.1.attn.hook_z"]
    assert torch.allclose(box["z"].view(tl.shape), tl, atol=1e-5)


def test_gradient_agrees_with_finite_differences(linear64):
    """atp = delta . grad equals the central difference of LD along delta (float64)."""
    res = A.attribute(linear64, PAIRS.iloc[:1], components=["resid_pre", "attn_out"], heads=False)
    pp = _prepared(linear64)[0]
    eps = 1e-4
    for comp, L, p in [("resid_pre", 1, pp.diff_positions[0]), ("attn_out", 0, pp.n_tokens - 1)]:
        name = f"blocks.{L}.hook_{comp}"
        clean = _clean_act(linear64, pp, name)
        delta = clean - _clean_act(linear64, pp, name, side="corrupted_ids")

        def step(s, p=p, delta=delta):
            def fn(x, hook=None):
                out = x.clone()
                out[:, p] = x[:, p] + s * delta[:, p]
                return out

            return fn

        fd = (
            _ld_with(linear64, pp, [(name, step(eps))])
            - _ld_with(linear64, pp, [(name, step(-eps))])
        ) / (2 * eps)
        assert res.scores[comp][0, L, p] == pytest.approx(fd, rel=1e-5, abs=1e-8)
        assert abs(fd) > 1e-4


def test_batched_equals_unbatched(native):
    """One pair per batch (token budget below one pair) equals all pairs of a length at once."""
    kw = dict(
        components=["resid_pre", "attn_out", "mlp_out", "resid_post"], heads=True, qk_fix=True
    )
    one = A.attribute(native, PAIRS, max_tokens_per_batch=1, **kw)
    big = A.attribute(native, PAIRS, max_tokens_per_batch=100_000, **kw)
    assert set(one.scores) == {"resid_pre", "attn_out", "mlp_out", "resid_post", "z", "q", "k"}
    for c in one.scores:
        assert np.allclose(one.scores[c], big.scores[c], atol=1e-5, equal_nan=True), c
        assert np.isfinite(one.scores[c]).any()
    assert one.info["forward_passes_per_pair"] == 2 and one.info["backward_passes_per_pair"] == 1


def test_means_on_arrays_equal_the_summary_of_the_tidy_cells(native):
    """The array path (hundreds of pairs x 100,000 cells) gives summarize's numbers."""
    df = PAIRS.copy()
    df.loc[len(df)] = {
        "pair_id": "p4",
        "clean": "Which is larger: 1 or 2? Answer:",
        "corrupted": "Which is larger: 3 or 2? Answer:",
        "clean_answer": " 1",
        "corrupted_answer": " 2",
    }
    res = A.attribute(native, df, components=["resid_pre", "mlp_out"], heads=True, positions=5)
    fast = res.means(n_boot=200, seed=3)
    slow = P.summarize(res.cells(), n_boot=200, seed=3)
    slow = slow[slow.metric == "recovery"]
    m = fast.merge(slow, on=S.KEY)
    assert len(m) == len(fast) == len(slow) and fast["n_pairs"].max() > 1
    assert (m["token_x"] == m["token_y"]).all() and (m["n_pairs_x"] == m["n_pairs_y"]).all()
    for a, b in (("atp", "mean"), ("atp_ci_low", "ci_low"), ("atp_ci_high", "ci_high")):
        assert np.allclose(m[a], m[b], rtol=1e-9, atol=1e-12, equal_nan=True)
    assert np.isfinite(m["atp_ci_low"]).sum() > 10  # the bootstrap was compared, not only NaN


def test_positions_and_unequal_lengths(native):
    res = A.attribute(native, PAIRS, components=["resid_post"], heads=True, positions=2)
    pp = _prepared(native)[0]
    row = res.scores["resid_post"][0, 0]
    assert np.isfinite(row[pp.n_tokens - 2 : pp.n_tokens]).all()
    assert np.isnan(row[: pp.n_tokens - 2]).all()
    assert np.isfinite(res.scores["z"][0, 0, :, pp.n_tokens - 1]).all()
    bad = PAIRS.iloc[:1].assign(corrupted="Which is larger: 3470 or 839? Answer:")
    with pytest.raises(InputError, match="different lengths"):
        A.attribute(native, bad, heads=False)


def test_bridge_and_bad_settings_are_refused(native, bridge):
    with pytest.raises(LayerscopeError, match="native engine"):
        A.attribute(bridge, PAIRS)
    with pytest.raises(LayerscopeError, match="QK fix"):
        A.attribute(native, PAIRS, heads=False, qk_fix=True)
    with pytest.raises(LayerscopeError, match="resid_mid"):
        A.attribute(native, PAIRS, components=["resid_mid"])


def test_graddrop_is_the_plain_magnitude_where_nothing_is_dropped(native):
    """GradDrop cuts gradient through a layer's outputs: the last layer's resid_post has no
    layer downstream, so its GradDrop magnitude is |atp|; upstream cells change."""
    res = A.attribute(
        native, PAIRS, components=["resid_pre", "resid_post"], heads=False, grad_drop=True
    )
    last = native.cfg.n_layers - 1
    a, g = res.scores["resid_post"][:, last], res.graddrop["resid_post"][:, last]
    ok = np.isfinite(a)
    assert np.allclose(g[ok], np.abs(a[ok]), atol=1e-6)
    up_a, up_g = res.scores["resid_pre"][:, 0], res.graddrop["resid_pre"][:, 0]
    ok = np.isfinite(up_a)
    assert not np.allclose(up_g[ok], np.abs(up_a[ok]), atol=1e-6)
    assert res.info["backward_passes_per_pair"] == 1 + native.cfg.n_layers


# ---------------------------------------------------------------------------------------------
# the QK fix


@pytest.fixture(scope="module")
def attn_only(tmp_path_factory):
    """A one-layer attention-only GPT-2 (MLP zeroed) in float64 with no final norm: LD is linear
    in the attention pattern, so the QK fix (exact softmax, linear after it) is exact."""
    d = build_tiny_model(
        tmp_path_factory.mktemp("attn"), "gpt2", n_layers=1, d_model=32, n_heads=N_HEADS, seed=3
    )
    _sharpen(d, scale=6.0, attn_only=True)
    eng = load_engine(str(d), engine="native")[0]
    eng.model.double()
    eng.model.transformer.ln_f = torch.nn.Identity()
    return eng


def _qkv_patch(engine, pp, which: int, head: int, p: int):
    """Exact LD change from writing the clean query (0) or key (1) of one head at one position
    into the corrupted run, by a hook on the fused QKV projection's output."""
    attn = engine.model.transformer.h[0].attn
    d = engine.cfg.d_model
    d_head = d // N_HEADS
    box = {}
    hook = attn.c_attn.register_forward_hook(
        lambda m, a, o: box.setdefault("c", o.detach().clone())
    )
    ids = torch.tensor([pp.clean_ids])
    with torch.no_grad():
        engine(ids, attention_mask=torch.ones_like(ids))
    hook.remove()
    sl = slice(which * d + head * d_head, which * d + (head + 1) * d_head)

    def patch(m, a, o):
        o = o.clone()
        o[:, p, sl] = box["c"][:, p, sl]
        return o

    base = _ld_with(engine, pp)
    hook = attn.c_attn.register_forward_hook(patch)
    try:
        return _ld_with(engine, pp) - base
    finally:
        hook.remove()


def test_head_z_attribution_equals_exact_last_layer(attn_only):
    """Per head: z is the output projection's input; with no MLP after it and no final norm, LD
    is linear in the last layer's z."""
    res = A.attribute(attn_only, PAIRS, components=[], heads=True)
    L = attn_only.cfg.n_layers - 1
    proj = A.head_taps(attn_only, L)[1]
    pp = _prepared(attn_only)[0]
    box = {}
    h = attn_only.model.transformer.h[L].attn.c_proj.register_forward_pre_hook(
        lambda m, a: box.setdefault("z", a[0].detach().clone())
    )
    ids = torch.tensor([pp.clean_ids])
    with torch.no_grad():
        attn_only(ids, attention_mask=torch.ones_like(ids))
    h.remove()
    d_head = box["z"].shape[-1] // N_HEADS
    base, checked = _ld_with(attn_only, pp), 0
    for head in range(N_HEADS):
        for p in (pp.diff_positions[0], pp.n_tokens - 1):
            sl = slice(head * d_head, (head + 1) * d_head)

            def pre(m, a, sl=sl, p=p):
                x = a[0].clone()
                x[:, p, sl] = box["z"][:, p, sl]
                return (x,)

            exact = _ld_with(attn_only, pp, pre=[(proj, pre)]) - base
            assert res.scores["z"][0, L, head, p] == pytest.approx(exact, rel=1e-8, abs=1e-9)
            checked += abs(exact) > 1e-4
    assert checked > 0


def test_qk_fix_equals_exact_key_and_query_patching(attn_only):
    res = A.attribute(attn_only, PAIRS, components=[], heads=True, qk_fix=True)
    pp = _prepared(attn_only)[0]
    j, last = pp.diff_positions[0], pp.n_tokens - 1
    seen = 0
    for head in range(N_HEADS):
        exact_k = _qkv_patch(attn_only, pp, 1, head, j)
        assert res.scores["k"][0, 0, head, j] == pytest.approx(exact_k, rel=1e-7, abs=1e-9)
        exact_q = _qkv_patch(attn_only, pp, 0, head, last)
        assert res.scores["q"][0, 0, head, last] == pytest.approx(exact_q, rel=1e-7, abs=1e-9)
        seen += abs(exact_k) > 1e-4
    assert seen > 0


# ---------------------------------------------------------------------------------------------
# the screen


def test_verified_cells_equal_the_exact_sweep_bit_for_bit(native, bridge):
    kw = dict(
        components=["resid_pre", "attn_out", "mlp_out", "resid_post"],
        heads=True,
        head_positions="positions",
        positions=6,
        batch_size=64,
    )
    full = P.patch_sweep(bridge, PAIRS, **kw)
    res = A.attribute(native, PAIRS, components=kw["components"], heads=True, positions=6)
    table = S.select_cells(S.attribution_table(res.cells(), 50, 0), 8, 12, seed=0)
    ver = P.patch_sweep(bridge, PAIRS, only=S.verify_keys(table), **kw)
    key = ["pair_id", "component", "layer", "position", "head", "metric"]
    merged = ver.df.merge(full.df, on=key, suffixes=("_v", "_f"))
    assert len(merged) == len(ver.df) > 0
    assert (merged["value_v"].to_numpy() == merged["value_f"].to_numpy())[
        np.isfinite(merged["value_f"].to_numpy())
    ].all()
    done = S.with_exact(table, ver.df)
    assert done["verified"].sum() == 20 and (done["sample"] == "top").sum() == 8
    mean = full.df[full.df.metric == "recovery"].groupby(S.KEY)["value"].mean()
    for r in done[done["verified"]].itertuples():
        assert r.exact == mean.loc[(r.n_tokens, r.component, r.layer, r.position, r.head)]


def _planted(rng, n=4000, share=0.03):
    """A cell table with planted effects: a few large, the rest small; atp = exact + noise."""
    exact = rng.normal(0, 0.02, n)
    big = rng.random(n) < share
    exact[big] = rng.choice([-1, 1], big.sum()) * rng.uniform(0.3, 1.0, big.sum())
    atp = exact + rng.normal(0, 0.25, n)  # a noisy screen: it misses some large effects
    table = pd.DataFrame(
        {
            "n_tokens": 10,
            "component": "resid_post",
            "layer": np.arange(n) // 10,
            "position": np.arange(n) % 10,
            "head": -1,
            "token": "x",
            "atp": atp,
        }
    )
    cells = table[S.KEY].assign(pair_id="p", metric="recovery", value=exact)
    return table, cells, exact


def test_miss_rate_interval_covers_the_true_miss_rate():
    """Planted effects, 150 simulated screens: the Wilson interval of the sample's exceedance
    rate covers the true share of unverified cells above X in about 95 % of them
    (about 5 s)."""
    rng = np.random.default_rng(7)
    covered, total = 0, 150
    for rep in range(total):
        table, cells, _ = _planted(rng, n=2000)
        table = S.attribution_table_from_means(table)
        table = S.select_cells(table, top_k=30, n_random=150, seed=rep)
        sel = table["sample"] != ""
        table = S.with_exact(table, cells.merge(table.loc[sel, S.KEY], on=S.KEY))
        miss = S.miss_rate(table)
        ex = table[S.KEY].merge(cells, on=S.KEY, how="left")["value"].to_numpy()
        unv = ~table["verified"].to_numpy()
        true_rate = float(np.mean(np.abs(ex[unv]) > miss["threshold"]))
        covered += miss["ci_low"] <= true_rate <= miss["ci_high"]
    assert covered / total >= 0.9
    assert "of the" in miss["statement"] and "unverified cells" in miss["statement"]


def test_correlations_and_degenerate_warning():
    rng = np.random.default_rng(0)
    table, cells, _ = _planted(rng, n=300)
    table = S.select_cells(S.attribution_table_from_means(table), 20, 60, seed=0)
    table = S.with_exact(table, cells)
    rows = {r["component"]: r for r in S.correlations(table, 200, 0)}
    r = rows["all"]
    assert r["n_cells"] == 80 and r["spearman_ci_low"] <= r["spearman"] <= r["spearman_ci_high"]
    assert 0.3 < r["pearson"] < 1
    assert S.degenerate(table) is None
    assert "zero" in S.degenerate(table.assign(atp=0.0))


def test_screen_job_writes_tables_and_figures(model_dir, tmp_path):
    import h5py

    from layerscope.jobs.attribution_run import attribution_experiment
    from layerscope.plotting import attribution as PA

    pairs = tmp_path / "pairs.csv"
    PAIRS.to_csv(pairs, index=False)
    out = {k: tmp_path / f"a.{k}" for k in ("table", "arrays", "summary")}
    info = attribution_experiment(
        pairs,
        out,
        model={"source": str(model_dir)},
        settings={"attribution": {"top_k": 5, "n_random": 10, "grad_drop": True}, "n_boot": 50},
        method="screen",
        device="cpu",
        batch_size=64,
        threads=1,
        log=lambda m: None,
    )
    table = pd.read_csv(out["table"], keep_default_na=False, na_values=[""])
    assert list(table.columns) == list(S.ATTRIBUTION_COLUMNS) + ["atp_graddrop"]
    assert table["verified"].sum() == 15 and table["rank"].min() == 1
    assert set(table["component"]) >= {"resid_pre", "z", "q", "k"}
    assert not table.loc[table.component.isin(["q", "k"]), "verified"].any()
    summary = json.loads(out["summary"].read_text())
    assert summary["passes_per_pair"] == {"forward": 2.0, "backward": 3.0}
    assert summary["miss_rate"]["statement"] == info["summary"]["miss_rate"]["statement"]
    with h5py.File(out["arrays"]) as f:
        assert f["atp/resid_pre"].shape[:2] == (3, 2) and f["atp/z"].shape[2] == N_HEADS
        assert "graddrop/z" in f
    names = dict(model="m", experiment="e")
    for fig in (
        PA.draw_attribution_heatmaps(table, **names),
        PA.draw_attribution_heads(table, **names),
        PA.draw_attribution_scatter(table, summary, **names),
    ):
        assert fig.axes


@pytest.fixture(scope="module")
def attn_only_gqa(tmp_path_factory):
    """A one-layer attention-only Qwen2 (4 query heads, 2 key/value heads, rotary), float64, no
    final norm: LD is linear in the attention pattern here too."""
    d = build_tiny_model(
        tmp_path_factory.mktemp("gqa"), "qwen2", n_layers=1, d_model=32, n_heads=N_HEADS, seed=4
    )
    _sharpen(d, scale=6.0, attn_only=True)
    eng = load_engine(str(d), engine="native")[0]
    eng.model.double()
    eng.model.model.norm = torch.nn.Identity()
    return eng


def _proj_patch(engine, pp, proj, head: int, p: int, d_head: int):
    """Exact LD change from writing the clean output of ``proj`` (q_proj or k_proj, before the
    rotary embedding, which acts per position) for one head at one position."""
    box = {}
    hook = proj.register_forward_hook(lambda m, a, o: box.setdefault("c", o.detach().clone()))
    ids = torch.tensor([pp.clean_ids])
    with torch.no_grad():
        engine(ids, attention_mask=torch.ones_like(ids))
    hook.remove()
    sl = slice(head * d_head, (head + 1) * d_head)

    def patch(m, a, o):
        o = o.clone()
        o[:, p, sl] = box["c"][:, p, sl]
        return o

    base = _ld_with(engine, pp)
    hook = proj.register_forward_hook(patch)
    try:
        return _ld_with(engine, pp) - base
    finally:
        hook.remove()


def test_qk_fix_with_grouped_query_attention_and_rotary(attn_only_gqa):
    eng = attn_only_gqa
    res = A.attribute(eng, PAIRS, components=[], heads=True, qk_fix=True)
    assert res.scores["k"].shape[2] == 2 and res.scores["q"].shape[2] == N_HEADS
    attn = eng.model.model.layers[0].self_attn
    d_head = eng.cfg.d_model // N_HEADS
    pp = _prepared(eng)[0]
    j, last = pp.diff_positions[0], pp.n_tokens - 1
    seen = []
    for kv in range(2):
        exact = _proj_patch(eng, pp, attn.k_proj, kv, j, d_head)
        assert res.scores["k"][0, 0, kv, j] == pytest.approx(exact, rel=1e-7, abs=1e-9)
        seen.append(abs(exact))
    for head in range(N_HEADS):
        exact = _proj_patch(eng, pp, attn.q_proj, head, last, d_head)
        assert res.scores["q"][0, 0, head, last] == pytest.approx(exact, rel=1e-7, abs=1e-9)
        seen.append(abs(exact))
    assert max(seen) > 1e-4  # not vacuous
