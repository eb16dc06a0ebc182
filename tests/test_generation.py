"""Generation-time patching (layerscope.interventions.generation) on the demo model and tiny offline
models.

The reference for every patched generation is an independent loop: plain ``transformers``
``AutoModelForCausalLM.generate`` (loaded separately from the bridge) with torch forward hooks on
the decoder block, its attention and its MLP.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformer_lens")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.analysis import power  # noqa: E402
from layerscope.engine.loading import load_model  # noqa: E402
from layerscope.engine.tokens import resolve_bos, tokenize_prompts  # noqa: E402
from layerscope.errors import InputError, LayerscopeError  # noqa: E402
from layerscope.interventions import generation as G  # noqa: E402
from layerscope.interventions import patching as P  # noqa: E402

PRECISION = {"confidence": 0.95, "half_width": 0.1, "rate_effect": 0.2, "power": 0.8}
N_NEW = 4


@pytest.fixture(scope="module")
def demo(repo):
    bridge, _ = load_model(str(repo / "demo/model"), device="cpu")
    pairs = P.load_pairs(repo / "demo/data/patching_pairs.csv")
    return repo / "demo/model", bridge, pairs


@pytest.fixture(scope="module")
def demo_sweep(demo):
    """One sweep over every kind of cell, shared by several tests."""
    _, bridge, pairs = demo
    return G.generation_sweep(
        G.BridgeStepper(bridge),
        bridge.tokenizer,
        pairs.iloc[[0, 1, 12, 13]],
        components=G.COMPONENTS,
        layers=[0, 2, 5],
        positions=[-1, "diff", "gen1", "gen2"],
        ranges=["prompt", "gen1-2"],
        max_new_tokens=N_NEW,
        batch_size=64,
    )


@pytest.fixture(scope="module")
def native_sweep(demo):
    """The same sweep on the native engine (plain HF model, SDPA, its own KV cache): what the
    workflow runs."""
    from layerscope.engine.loading import load_engine

    path, _, pairs = demo
    engine, info = load_engine(
        str(path), engine="native", components=list(G.COMPONENTS), device="cpu"
    )
    assert info["engine"] == "native"
    st = G.stepper_for(engine)
    assert isinstance(st, G.NativeStepper)
    return G.generation_sweep(
        st,
        engine.tokenizer,
        pairs.iloc[[0, 1, 12, 13]],
        components=G.COMPONENTS,
        layers=[0, 2, 5],
        positions=[-1, "diff", "gen1", "gen2"],
        ranges=["prompt", "gen1-2"],
        max_new_tokens=N_NEW,
        batch_size=64,
    )


def _hf(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens tokens, like the sweep
    return model


def _hf_greedy(hf, ids, n):
    # An explicit mask: GPT-2's pad id is its BOS id, and generate would otherwise mask the BOS
    # token.
    x = torch.tensor([ids])
    return hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
    )


def _ids(bridge, text):
    return tokenize_prompts(
        bridge.tokenizer, [text], prepend_bos=resolve_bos(bridge.tokenizer, "auto")
    )[0]


# --------------------------------------------------------------------------------------------
# the independent reference: HF generate + torch hooks


def _module(hf, component, layer):
    block = hf.transformer.h[layer] if hasattr(hf, "transformer") else hf.model.layers[layer]
    if component in ("resid_pre", "resid_post"):
        return block
    if component == "attn_out":
        return block.attn if hasattr(block, "attn") else block.self_attn
    return block.mlp


def _hf_generate(hf, ids, component, layer, patch=None, capture=None):
    """``hf.generate`` with the activation of (component, layer) captured or overwritten.

    ``patch``: (absolute positions, source ``[L, d]``). Each forward call processes the positions
    ``[offset, offset + n)``; the hook tracks the offset itself (block ``layer`` runs once per
    call).
    """
    state = {"offset": 0}

    def edit(hidden):
        n = hidden.shape[1]
        if capture is not None:
            capture.append(hidden[0].clone())
        if patch is not None:
            hidden = hidden.clone()
            for p in patch[0]:
                if state["offset"] <= p < state["offset"] + n:
                    hidden[0, p - state["offset"]] = patch[1][p]
        state["offset"] += n
        return hidden

    mod = _module(hf, component, layer)
    if component == "resid_pre":

        def pre(module, args, kwargs):
            if args:
                return (edit(args[0]),) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = edit(kwargs["hidden_states"])
            return args, kwargs

        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(module, args, out):
            if isinstance(out, tuple):
                return (edit(out[0]),) + tuple(out[1:])
            return edit(out)

        handle = mod.register_forward_hook(post)
    try:
        with torch.no_grad():
            out = _hf_greedy(hf, ids, N_NEW)
    finally:
        handle.remove()
    return out[0, len(ids) :].tolist()


def _reference(hf, bridge, pair, component, layer, label):
    clean, corr = _ids(bridge, pair["clean"]), _ids(bridge, pair["corrupted"])
    store: list = []
    _hf_generate(hf, clean, component, layer, capture=store)
    source = torch.cat(store, dim=0)  # [T + N - 1, d]: the clean run's own continuation
    diff = [i for i, (a, b) in enumerate(zip(clean, corr)) if a != b]
    pos = G.absolute_positions(label, len(corr), N_NEW, diff)
    return _hf_generate(hf, corr, component, layer, patch=(pos, source))


# --------------------------------------------------------------------------------------------
# the engine


@pytest.mark.parametrize("arch", ["demo", "qwen2", "llama"])
def test_cached_generation_equals_hf_generate(demo, arch, tmp_path):
    path = (
        demo[0]
        if arch == "demo"
        else build_tiny_model(tmp_path, arch, n_layers=2, d_model=32, n_heads=4, seed=1)
    )
    bridge = demo[1] if arch == "demo" else load_model(str(path), device="cpu")[0]
    hf = _hf(path)
    prompts = ["Which is larger: 328 or 586? Answer:", "Which is larger: 922 or 748? Answer:"]
    ids = [_ids(bridge, p) for p in prompts]
    st = G.BridgeStepper(bridge)
    with torch.inference_mode(), st.session():
        ours, _ = G.greedy_generate(st, torch.tensor(ids), 6)
    for row, x in zip(ours.tolist(), ids):
        with torch.no_grad():
            ref = _hf_greedy(hf, x, 6)
        assert row == ref[0, len(x) :].tolist()


def test_without_the_cache_hand_over_cached_steps_are_wrong(demo):
    """Why BridgeStepper.session exists: the bridge alone leaves the KV cache empty here."""
    _, bridge, _ = demo
    x = torch.tensor([_ids(bridge, "Which is larger: 328 or 586? Answer:")])
    st = G.BridgeStepper(bridge)
    with torch.inference_mode():
        first, _ = st.step(x, None, 0)
        with pytest.raises(LayerscopeError, match="KV cache"):
            _, past = st.bridge(x, return_type="logits_and_cache", use_cache=True)
            st.step(first.argmax(-1)[:, None], past, x.shape[1])
        with st.session():
            _, past = st.step(x, None, 0)
            step, _ = st.step(first.argmax(-1)[:, None], past, x.shape[1])
        full = bridge(torch.cat([x, first.argmax(-1)[:, None]], 1), return_type="logits")[:, -1]
    assert torch.allclose(step, full, atol=1e-4)


def test_batched_equals_unbatched(demo, demo_sweep):
    _, bridge, pairs = demo
    one = G.generation_sweep(
        G.BridgeStepper(bridge),
        bridge.tokenizer,
        pairs.iloc[[0, 1, 12, 13]],
        components=G.COMPONENTS,
        layers=[0, 2, 5],
        positions=[-1, "diff", "gen1", "gen2"],
        ranges=["prompt", "gen1-2"],
        max_new_tokens=N_NEW,
        batch_size=1,
    )
    pd.testing.assert_frame_equal(one, demo_sweep)


def test_patching_every_prompt_position_at_layer0_gives_the_clean_generation(demo_sweep):
    df = demo_sweep
    clean = df[df.position == "clean_prompt"].set_index("pair_id")["generated_ids"]
    cells = df[
        (df.component == "resid_pre") & (df.layer == 0) & (df.position == "prompt")
    ].set_index("pair_id")
    assert len(cells) == 4
    assert (cells["generated_ids"] == clean.loc[cells.index]).all()
    assert cells["matches_clean"].sum() == df[df.position == "clean_prompt"]["matches_clean"].sum()


def test_patching_the_corrupted_runs_own_activation_gives_the_corrupted_generation(demo):
    _, bridge, pairs = demo
    df = G.generation_sweep(
        G.BridgeStepper(bridge),
        bridge.tokenizer,
        pairs.iloc[[0, 12]],
        components=G.COMPONENTS,
        layers=[0, 3],
        positions=["diff", "gen1"],
        ranges=["prompt", "gen1-3"],
        max_new_tokens=N_NEW,
        source="corrupted",
        skip_identical=False,
    )
    corr = df[df.position == "corrupted_prompt"].set_index("pair_id")["generated_ids"]
    cells = df[df.component != G.BASELINE]
    assert len(cells) == 2 * 4 * 2 * 4
    assert (cells["generated_ids"].to_numpy() == corr.loc[cells.pair_id].to_numpy()).all()


def test_native_engine_generates_what_the_bridge_generates(demo_sweep, native_sweep):
    cols = [
        "pair_id",
        "component",
        "layer",
        "position",
        "generated_ids",
        "matches_clean",
        "matches_corrupted",
    ]
    pd.testing.assert_frame_equal(native_sweep[cols], demo_sweep[cols])


@pytest.mark.parametrize("engine", ["bridge", "native"])
@pytest.mark.parametrize("component", G.COMPONENTS)
def test_patched_generation_equals_hf_generate_with_a_forward_hook(
    demo, demo_sweep, native_sweep, component, engine
):
    path, bridge, pairs = demo
    demo_sweep = demo_sweep if engine == "bridge" else native_sweep
    hf = _hf(path)
    for layer in (0, 5):
        for label in ("diff", "16", "gen1", "prompt", "gen1-2"):
            for i in (0, 12):
                pair = pairs.iloc[i]
                if label == "16" and len(_ids(bridge, pair["clean"])) != 17:
                    continue  # position -1 of the 17-token pairs only
                row = demo_sweep[
                    (demo_sweep.pair_id == pair.pair_id)
                    & (demo_sweep.component == component)
                    & (demo_sweep.layer == layer)
                    & (demo_sweep.position == label)
                ]
                assert len(row) == 1, (component, layer, label)
                ref = _reference(hf, bridge, pair, component, layer, label)
                assert row["generated_ids"].iloc[0] == " ".join(map(str, ref)), (
                    component,
                    layer,
                    label,
                    pair.pair_id,
                )


# --------------------------------------------------------------------------------------------
# positions and answers


def test_positions():
    assert G.absolute_positions("3", 10, 4) == [3]
    assert G.absolute_positions("-1", 10, 4) == [9]
    assert G.absolute_positions("gen1", 10, 4) == [10]  # the first generated token's position
    assert G.absolute_positions("gen1-3", 10, 4) == [10, 11, 12]
    assert G.absolute_positions("prompt", 4, 2) == [0, 1, 2, 3]
    assert G.absolute_positions("diff", 10, 4, [6, 2]) == [2, 6]
    with pytest.raises(LayerscopeError, match="max_new_tokens - 1"):
        G.absolute_positions(
            "gen4", 10, 4
        )  # token 4 is the last one generated: nothing reads its position
    with pytest.raises(LayerscopeError, match="does not exist"):
        G.absolute_positions("12", 10, 4)
    assert G.expand_positions("all", 3, 3) == ["0", "1", "2", "diff", "gen1", "gen2"]
    assert G.expand_positions(2, 5, 3) == ["3", "4"]
    assert G.expand_positions([-1, "gen2", 4, "diff"], 5, 3) == ["4", "gen2", "diff"]
    with pytest.raises(LayerscopeError, match="range"):
        G.expand_positions(["gen1-2"], 5, 3)
    with pytest.raises(LayerscopeError, match="not understood"):
        G.position_kind("last")
    cells = G.build_cells(["resid_pre"], [0, 1], ["3"], ["prompt"])
    assert [(c.layer, c.position, c.kind) for c in cells] == [
        (0, "3", "prompt"),
        (1, "3", "prompt"),
        (0, "prompt", "range"),
        (1, "prompt", "range"),
    ]


def test_answer_extraction():
    assert G.extract_answer(" 586 or so") == "586"
    assert G.extract_answer(" -3.5 degrees") == "-3.5"
    assert G.extract_answer(" Paris, France") == "Paris"
    assert G.extract_answer("  ?! ") == ""
    assert G.extract_answer("The answer is 42.", r"answer is (\d+)") == "42"
    assert G.extract_answer("no number", r"answer is (\d+)") == ""
    assert G.normalize_expected(" 586") == "586"
    assert G.normalize_expected(" ?? ") == "??"


def test_answers_compared_by_the_rule(demo_sweep):
    df = demo_sweep
    assert (df["matches_clean"] == (df["answer"] == df["clean_answer"])).all()
    assert (df["matches_corrupted"] == (df["answer"] == df["corrupted_answer"])).all()
    assert not (df["matches_clean"] & df["matches_corrupted"]).any()
    assert set(df.clean_answer) == {"586", "748", "31", "59"}


def test_bad_pairs_and_settings(demo, tmp_path):
    _, bridge, pairs = demo
    f = tmp_path / "pairs.csv"
    f.write_text(
        "pair_id,clean,corrupted,clean_answer,corrupted_answer\n"
        "a,Which is larger: 3 or 5? Answer:,Which is larger: 3 or 15? Answer:, 5, 15\n"
    )
    with pytest.raises(InputError, match=r"pairs\.csv.*line 2.*corrupted.*different lengths"):
        G.generation_sweep(G.BridgeStepper(bridge), bridge.tokenizer, P.load_pairs(f), layers=[0])
    f.write_text(
        "pair_id,clean,corrupted,clean_answer,corrupted_answer\n"
        "a,Which is larger: 3 or 5? Answer:,Which is larger: 3 or 1? Answer:, 5,5.\n"
    )
    with pytest.raises(InputError, match="line 2.*corrupted_answer"):
        G.generation_sweep(G.BridgeStepper(bridge), bridge.tokenizer, P.load_pairs(f), layers=[0])
    st = G.BridgeStepper(bridge)
    with pytest.raises(LayerscopeError, match="unknown component"):
        G.generation_sweep(st, bridge.tokenizer, pairs.iloc[:1], components=["resid"], layers=[0])
    with pytest.raises(LayerscopeError, match="answer_regex"):
        G.generation_sweep(st, bridge.tokenizer, pairs.iloc[:1], layers=[0], answer_regex="(")
    with pytest.raises(LayerscopeError, match="layers"):
        G.generation_sweep(st, bridge.tokenizer, pairs.iloc[:1], layers=[6])


# --------------------------------------------------------------------------------------------
# the summary


def test_summary_intervals_are_wilson_and_n_columns_from_power(demo_sweep):
    s = G.summarize_generation(demo_sweep, PRECISION)
    lo, hi = power.wilson_interval(s.n_clean.to_numpy(), s.n_pairs.to_numpy(), 0.95)
    np.testing.assert_allclose(s.ci_low, lo)
    np.testing.assert_allclose(s.ci_high, hi)
    assert (s.recovery_rate == s.n_clean / s.n_pairs).all()
    for rec in s.sample(10, random_state=0).itertuples():
        want = power.rate_precision(
            rec.n_clean, rec.n_pairs, half_width=0.1, effect=0.2, p0=rec.unpatched_rate
        )
        assert rec.n_for_half_width == want["n_for_half_width"]
        assert rec.n_for_power == want["n_for_power"]
    # per length group and pooled (n_tokens 0) for cells every pair has
    assert set(s.n_tokens) == {0, 15, 17}
    pooled = s[(s.n_tokens == 0) & (s.component == G.BASELINE)].set_index("position")
    assert pooled.loc["corrupted_prompt", "n_pairs"] == 4
    assert set(s[s.n_tokens == 0].position_kind) == {"diff", "gen", "range", "none"}
    p0 = pooled.loc["corrupted_prompt", "recovery_rate"]
    assert (s[s.n_tokens == 0].unpatched_rate == p0).all()


def test_logit_recovery_beside_the_rate(demo, demo_sweep):
    _, bridge, pairs = demo
    res = P.patch_sweep(
        bridge,
        pairs.iloc[[0, 1, 12, 13]],
        components=G.COMPONENTS,
        layers=[0, 2, 5],
        positions=2,
        heads=False,
    )  # 16 and the appended space, 17
    ld = P.summarize(res, n_boot=50)
    lengths = G.length_map(demo_sweep, res.pairs)
    assert lengths == {17: 18, 15: 16}  # the sweep appends the shared answer token (the space)
    s = G.add_logit_recovery(G.summarize_generation(demo_sweep, PRECISION), ld, lengths)
    row = s[
        (s.n_tokens == 17) & (s.component == "resid_post") & (s.layer == 5) & (s.position == "16")
    ]
    want = ld[
        (ld.n_tokens == 18)
        & (ld.component == "resid_post")
        & (ld.layer == 5)
        & (ld.position == 16)
        & (ld.metric == "recovery")
    ]
    assert float(row.logit_recovery.iloc[0]) == pytest.approx(float(want["mean"].iloc[0]))
    assert s[s.position_kind == "gen"].logit_recovery.isna().all()
    # every empty logit_recovery says why, every filled one has no note (docs/methods.md)
    empty = s.logit_recovery.isna()
    assert (s.loc[empty, "logit_recovery_note"] != "").all()
    assert (s.loc[~empty, "logit_recovery_note"] == "").all() and (~empty).any()
    assert s[s.position_kind == "gen"].logit_recovery_note.str.contains("gen cell").all()
