"""Steering along directions: exactness of alpha = 0, a planted direction, plain-transformers
agreement,
direction sources, bad files and the Snakemake plumbing."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, copy_workflow, run_snakemake

from layerscope.engine.loading import load_model
from layerscope.errors import ConfigError, InputError
from layerscope.interventions import steering as S
from layerscope.jobs import steering_run as R

DEMO = REPO / "demo" / "model"
DATA = REPO / "demo" / "data" / "steering"
GAIN = 0.02  # the planted read-out stays in its linear range: random directions are not saturated


@pytest.fixture(scope="module")
def demo():
    bridge, info = load_model(str(DEMO), device="cpu")
    return bridge


@pytest.fixture(scope="module")
def demo_prompts(demo):
    prompts = R.load_prompts(DATA / "numbers.csv").iloc[:6].copy()
    prompts.attrs["source"] = "numbers.csv"
    neutral = R.load_neutral(DATA / "neutral.txt")[:3]
    return S.prepare_prompts(demo.tokenizer, prompts, neutral, prepend_bos=True)


# --------------------------------------------------------------------------------------------
# alpha = 0 is the unsteered run, bit for bit


def test_alpha_zero_equals_unsteered_bit_for_bit(demo, demo_prompts):
    rows = demo_prompts.ids + demo_prompts.neutral_ids
    starts = S.row_starts([len(r) for r in rows], "all")
    with torch.inference_mode():
        base = S.run_rows(demo, rows, None, None, None, batch_size=4, pad_id=0)
        v = torch.as_tensor(
            0.0 * np.random.default_rng(0).standard_normal(128), dtype=torch.float64
        )
        zero = S.run_rows(demo, rows, "blocks.2.hook_resid_post", v, starts, batch_size=4, pad_id=0)
        moved = S.run_rows(
            demo, rows, "blocks.2.hook_resid_post", v + 1.0, starts, batch_size=4, pad_id=0
        )
    assert all(torch.equal(a, b) for a, b in zip(base, zero))
    assert not all(torch.equal(a, b) for a, b in zip(base, moved))  # the hook does act


def test_sweep_alpha_zero_gives_exactly_zero(demo, demo_prompts):
    d = np.random.default_rng(1).standard_normal(128)
    res = S.steering_sweep(demo, demo_prompts, {1: d, 4: d}, alphas=[-0.5, 0.5], n_random=3)
    z = res.effects[res.effects["alpha"] == 0]
    assert len(z) == 2 * 3 * (1 + 3 + 1)  # layers x metrics x (direction, 3 random, band)
    assert (z["value"] == 0).all() and (z["ci_low"] == 0).all() and (z["ci_high"] == 0).all()
    nz = res.effects[(res.effects["alpha"] != 0) & (res.effects["metric"] == "logit_diff")]
    assert (nz["value"].abs() > 0).all()
    assert sorted(res.effects.columns[:7]) == sorted(
        ["layer", "alpha", "source", "direction", "metric", "statistic", "value"]
    )
    assert {"n_for_half_width", "n_for_power", "half_width", "ci_low", "ci_high"} <= set(
        res.effects.columns
    )


# --------------------------------------------------------------------------------------------
# a model built so that one direction at a known layer controls the answer


def _planted_model(tmp_path):
    """3-layer GPT-2 whose attention and MLP outputs are zero except block 2's MLP, which reads the
    centred unit direction u (through ln_2) and writes a large step along wte[a] - wte[b].

    Steering along u before block 2 (resid_post of layers 0 and 1) moves logit[a] - logit[b]; after
    it (layer 2) u reaches the output only through the final norm, orthogonal to that difference.
    A random direction meets u only with a weight of about 1/sqrt(d_model).
    """
    from transformers import AutoModelForCausalLM

    from devkit.tiny_models import build_tiny_model

    path = build_tiny_model(
        tmp_path / "planted", "gpt2", n_layers=3, d_model=128, n_heads=4, seed=3
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    tok_a, tok_b = 5, 6
    with torch.no_grad():
        for blk in model.transformer.h:
            for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        wte = model.transformer.wte.weight  # tied: also the unembedding
        rng = np.random.default_rng(7)
        k = torch.tensor(rng.standard_normal(128), dtype=torch.float32)
        k = (k - k.mean()) / (k - k.mean()).norm()
        wte[tok_a] += 2.0 * k  # a wide logit range for the two answers (random rows are ~0.1 long)
        wte[tok_b] -= 2.0 * k
        dvec = wte[tok_a] - wte[tok_b]
        dvec = dvec - dvec.mean()
        u = torch.tensor(rng.standard_normal(128), dtype=torch.float32)
        u = u - u.mean()
        u = u - (u @ dvec) / (dvec @ dvec) * dvec  # orthogonal to the answer direction
        u = u / u.norm()
        mlp = model.transformer.h[2].mlp
        mlp.c_fc.weight.zero_()
        mlp.c_fc.bias.zero_()
        mlp.c_fc.weight[:, 0] = u  # GPT-2 Conv1D: weight [in, out]
        mlp.c_fc.bias[0] = 20.0  # GELU is the identity there: a linear read-out of u
        mlp.c_proj.weight[0] = dvec / dvec.norm() * GAIN
        mlp.c_proj.bias[:] = -20.0 * mlp.c_proj.weight[0]
    model.save_pretrained(path)
    return path, u.double().numpy(), tok_a, tok_b


def test_planted_direction_is_strongest_at_the_right_layer(tmp_path):
    path, u, tok_a, tok_b = _planted_model(tmp_path)
    bridge, _ = load_model(str(path), device="cpu")
    tk = bridge.tokenizer
    texts = [
        "The capital of France is",
        "Which is larger: 12 or 71?",
        "the quick brown fox",
        "The Eiffel Tower",
        "Answer minimally: Given the numbers",
        "again and again",
        "jumps over the lazy dog",
        "The capital of",
    ]
    a, b = tk.decode([tok_a]), tk.decode([tok_b])
    ids = [f"p{i}" for i in range(len(texts))]
    prompts = pd.DataFrame(dict(prompt_id=ids, prompt=texts, positive=a, negative=b))
    sp = S.prepare_prompts(tk, prompts, texts[:3], prepend_bos=True)
    sp.positive_id[:] = tok_a  # the planted answer tokens, whatever their in-context tokenization
    sp.negative_id[:] = tok_b
    res = S.steering_sweep(
        bridge, sp, {0: u, 1: u, 2: u}, alphas=[-0.2, -0.1, 0.1, 0.2], n_random=10, seed=2
    )
    ld = res.effects[res.effects["metric"] == "logit_diff"]
    main = ld[(ld["source"] != "random") & (ld["alpha"] != 0)]
    rand = ld[ld["direction"].str.startswith("random_") & (ld["alpha"] != 0)]
    strongest = main.loc[main["value"].abs().idxmax()]
    assert int(strongest["layer"]) in (0, 1)
    assert (
        float(strongest["value"]) * float(strongest["alpha"]) > 0
    )  # positive alpha raises the answer
    before = main[main["layer"].isin([0, 1])]
    assert (np.sign(before["value"]) == np.sign(before["alpha"])).all()
    after = main[main["layer"] == 2]["value"].abs().max()
    assert (
        after < 0.05 * before["value"].abs().min()
    )  # past the read-out the direction does nothing
    for (L, a), g in rand[rand["layer"].isin([0, 1])].groupby(["layer", "alpha"]):
        planted = abs(
            float(before[(before["layer"] == L) & (before["alpha"] == a)]["value"].iloc[0])
        )
        assert planted > 2.5 * g["value"].abs().max(), (L, a)
    assert before["beyond_random"].astype(bool).all()


# --------------------------------------------------------------------------------------------
# the same numbers as an independent hook loop over plain transformers


@pytest.fixture(scope="module")
def hf_demo():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEMO), attn_implementation="eager").eval()


def _hf_steered_logits(hf, ids, layer, vec, start, pre=False):
    block = hf.transformer.h[layer]

    def add(x):
        x = x.clone()
        x[:, start:] += vec.to(x.dtype)
        return x

    if pre:
        handle = block.register_forward_pre_hook(lambda m, args: (add(args[0]),) + tuple(args[1:]))
    else:
        handle = block.register_forward_hook(
            lambda m, args, out: (
                (add(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else add(out)
            )
        )
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0].double()
    finally:
        handle.remove()


@pytest.mark.parametrize(
    "component,position", [("resid_post", "all"), ("resid_post", -3), ("resid_pre", 4)]
)
def test_steering_equals_plain_transformers_hook(demo, hf_demo, demo_prompts, component, position):
    vec = torch.as_tensor(np.random.default_rng(5).standard_normal(128) * 3.0, dtype=torch.float64)
    rows = demo_prompts.ids
    starts = S.row_starts([len(r) for r in rows], position)
    with torch.inference_mode():
        ours = S.run_rows(
            demo, rows, f"blocks.3.hook_{component}", vec, starts, batch_size=4, pad_id=0
        )
    for r, st, lg in zip(rows, starts, ours):
        ref = _hf_steered_logits(hf_demo, r, 3, vec.float(), int(st), pre=component == "resid_pre")
        assert torch.allclose(lg, ref, atol=2e-4), (lg - ref).abs().max()


def test_steered_generation_equals_plain_transformers_generate(demo, hf_demo, demo_prompts):
    vec = torch.as_tensor(np.random.default_rng(6).standard_normal(128) * 4.0, dtype=torch.float64)
    rows = demo_prompts.ids[:4]
    toks, _ = S.generate(demo, rows, 5, hook="blocks.2.hook_resid_post", vector=vec, batch_size=3)
    plain, _ = S.generate(demo, rows, 5)

    def add(m, args, out):
        return (
            (out[0] + vec.float(),) + tuple(out[1:])
            if isinstance(out, tuple)
            else out + vec.float()
        )

    handle = hf_demo.transformer.h[2].register_forward_hook(add)
    try:
        for r, got in zip(rows, toks):
            with torch.no_grad():
                mask = torch.ones(1, len(r), dtype=torch.long)
                ref = hf_demo.generate(
                    torch.tensor([r]),
                    attention_mask=mask,
                    max_new_tokens=5,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            assert got == ref[0, len(r) :].tolist()
    finally:
        handle.remove()
    assert toks != plain  # the vector changes what is generated


def test_batched_generation_equals_one_at_a_time(demo, demo_prompts):
    vec = torch.as_tensor(np.random.default_rng(8).standard_normal(128) * 2.0, dtype=torch.float64)
    rows = demo_prompts.ids
    kw = dict(hook="blocks.1.hook_resid_post", vector=vec, position=-2)
    batched, _ = S.generate(demo, rows, 4, batch_size=8, **kw)
    single = [S.generate(demo, [r], 4, **kw)[0][0] for r in rows]
    assert batched == single


# --------------------------------------------------------------------------------------------
# direction sources


def _probe_doc(X, y, component="resid_post", pooling="last"):
    from layerscope.analysis.probes import fit_probe

    res = fit_probe(
        X,
        y,
        n_splits=3,
        n_repeats=1,
        n_permutations=0,
        n_random_directions=0,
        positive_class="true",
    )
    return {"probes": [{"component": component, "pooling": pooling, "result": res.to_dict()}]}, res


def test_probe_direction_is_the_raw_space_gradient_of_the_probe():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 8)) * np.array(
        [1, 10, 0.1, 1, 1, 5, 1, 1]
    )  # very different scales
    y = np.where(X[:, 1] / 10 + X[:, 2] / 0.1 > 0, "true", "false")
    doc, res = _probe_doc(X, y)
    got = S.probe_direction(doc, "resid_post", "last")
    scaler = StandardScaler().fit(X)
    lr = LogisticRegression(C=res.C, max_iter=5000).fit(
        scaler.transform(X), (y == "true").astype(int)
    )
    expect = lr.coef_[0] / scaler.scale_
    assert np.allclose(got, expect / np.linalg.norm(expect), atol=1e-4)
    # moving along it raises the probe's score for the positive class, at the largest rate per unit
    # norm
    step = res.decision_function(X + got) - res.decision_function(X)
    assert np.allclose(step, np.linalg.norm(res.coef[0]))


def test_probe_direction_from_file_and_errors(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40, 6))
    y = np.where(X[:, 0] > 0, "true", "false")
    doc, res = _probe_doc(X, y)
    p = tmp_path / "layer_2.json"
    p.write_text(json.dumps(doc))
    dirs = R.load_directions(
        {"source": "probe", "component": "resid_post", "pooling": "last"},
        {"probes": {2: p}},
        [2],
        n_layers=4,
        d_model=6,
    )
    assert np.allclose(dirs[2], np.array(res.coef[0]) / np.linalg.norm(res.coef[0]))
    with pytest.raises(InputError, match=r"layer_2\.json.*no probe for resid_post/mean"):
        R.load_directions(
            {"source": "probe", "component": "resid_post", "pooling": "mean"},
            {"probes": {2: p}},
            [2],
            n_layers=4,
            d_model=6,
        )
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bad.json"):
        R.load_directions(
            {"source": "probe", "component": "resid_post", "pooling": "last"},
            {"probes": {2: bad}},
            [2],
            n_layers=4,
            d_model=6,
        )


def test_mass_mean_and_task_vector_directions():
    X = np.array([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [0, 4.0, 0]])
    got = S.mass_mean_direction(X, ["true", "true", "false", "false"], "true")
    assert np.allclose(got, np.array([2.0, -3.0, 0]) / np.sqrt(13))
    with pytest.raises(S.SteeringError, match="positive class"):
        S.mass_mean_direction(X, ["a", "a", "a", "a"], "true")
    arrays = {
        "layers": np.array([1, 3]),
        "tasks": ["sum", "max"],
        "task_vectors": np.array([[[1.0, 0], [0, 2.0]], [[0, 3.0], [4.0, 0]]]),
    }
    assert np.allclose(S.task_vector_direction(arrays, 3, "max"), [1.0, 0])
    with pytest.raises(S.SteeringError, match="no task 'min'"):
        S.task_vector_direction(arrays, 3, "min")


def test_mass_mean_from_the_pipeline_layer_file(tmp_path):
    """The mass-mean source reads the layer file through h5cache, the positive class from
    summary.json."""
    from layerscope.data.h5cache import copy_layer, read_layer
    from layerscope.engine.store import cache_store

    bridge, info = load_model(str(DEMO), device="cpu")
    texts = [
        "The capital of France is Paris",
        "The capital of France is Oslo",
        "The Louvre is located in Paris",
        "The Louvre is located in Lisbon",
    ]
    store = tmp_path / "store.h5"
    cache_store(
        bridge,
        ["a", "b", "c", "d"],
        texts,
        ["true", "false", "true", "false"],
        store,
        poolings=("last",),
        model_info=info,
        log=None,
    )
    layer_file = tmp_path / "layer_2.h5"
    copy_layer(store, 2, layer_file, layer_file)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"positive_class": "true"}))
    dirs = R.load_directions(
        {"source": "mass_mean", "component": "resid_post", "pooling": "last"},
        {"layers": {2: layer_file}, "summary": summary},
        [2],
        n_layers=6,
        d_model=128,
    )
    X = read_layer(layer_file, "resid_post", "last").X.astype(np.float64)
    expect = X[[0, 2]].mean(0) - X[[1, 3]].mean(0)
    assert np.allclose(dirs[2], expect / np.linalg.norm(expect))


def test_file_directions_npy_and_hdf5(tmp_path):
    import h5py

    rng = np.random.default_rng(2)
    one = rng.standard_normal(5)
    per_layer = rng.standard_normal((3, 5))
    np.save(tmp_path / "one.npy", one)
    np.save(tmp_path / "all.npy", per_layer)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["layer_1"] = per_layer[1]
        f["layer_2"] = per_layer[2]
    with h5py.File(tmp_path / "stack.h5", "w") as f:
        f["directions"] = per_layer
    u = lambda v: v / np.linalg.norm(v)  # noqa: E731
    assert np.allclose(R.file_directions(tmp_path / "one.npy", [0, 2], 3, 5)[2], u(one))
    assert np.allclose(R.file_directions(tmp_path / "all.npy", [0, 2], 3, 5)[2], u(per_layer[2]))
    assert np.allclose(R.file_directions(tmp_path / "d.h5", [1, 2], 3, 5)[1], u(per_layer[1]))
    assert np.allclose(R.file_directions(tmp_path / "stack.h5", [0], 3, 5)[0], u(per_layer[0]))


def test_bad_direction_files_name_file_and_field(tmp_path):
    import h5py

    np.save(tmp_path / "wrong_d.npy", np.ones(7))
    np.save(tmp_path / "wrong_rows.npy", np.ones((4, 5)))
    np.save(tmp_path / "zero.npy", np.zeros((3, 5)))
    np.save(tmp_path / "nan.npy", np.full(5, np.nan))
    with h5py.File(tmp_path / "missing.h5", "w") as f:
        f["layer_0"] = np.ones(5)
    (tmp_path / "x.txt").write_text("1 2 3")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    cases = [
        ("wrong_d.npy", r"wrong_d\.npy: field 'array': .*7 entries; the model's d_model is 5"),
        (
            "wrong_rows.npy",
            r"wrong_rows\.npy: field 'array': .*shape \(4, 5\); expected \[5\] or \[3, 5\]",
        ),
        ("zero.npy", r"zero\.npy: field 'array': .*zero vector"),
        ("nan.npy", r"nan\.npy: field 'array': .*not finite"),
        ("missing.h5", r"missing\.h5: field 'layer_2': no dataset 'layer_2'"),
        ("x.txt", r"x\.txt: unknown direction file type"),
        ("garbage.npy", r"garbage\.npy: not a readable \.npy"),
        ("absent.npy", r"absent\.npy: file not found"),
    ]
    for name, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            R.file_directions(tmp_path / name, [0, 2], 3, 5)


def test_prompt_file_errors(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt_id,prompt,positive\na,Hello, x\n")
    with pytest.raises(InputError, match=r"p\.csv: field 'negative': required column is missing"):
        R.load_prompts(p)
    p.write_text("prompt_id,prompt,positive,negative\na,Hello, x, x\n")
    with pytest.raises(InputError, match=r"p\.csv, line 2: field 'negative': .*identical"):
        R.load_prompts(p)
    p.write_text("prompt_id,prompt,positive,negative\na,Hello, x, y\na,Hi, x, y\n")
    with pytest.raises(InputError, match=r"p\.csv, line 3: field 'prompt_id': duplicate"):
        R.load_prompts(p)
    p.write_text("prompt_id,prompt\na,Hello\n")
    df = R.load_prompts(p, {"positive": " true", "negative": " false"})
    assert df.iloc[0].tolist() == ["a", "Hello", " true", " false"]
    n = tmp_path / "n.txt"
    n.write_text("# comment\n\n")
    with pytest.raises(InputError, match=r"n\.txt: no neutral prompts"):
        R.load_neutral(n)


# --------------------------------------------------------------------------------------------
# config and Snakemake plumbing


def _cfg(**exp):
    base = {
        "direction": {"source": "probe", "dataset": "d"},
        "prompts": "p.csv",
        "neutral": "n.txt",
        "layers": "all",
    }
    base.update(exp)
    return {
        "datasets": {"d": {"kind": "facts"}, "t": {"kind": "task_grid", "tasks": ["sum"]}},
        "activations": {"components": ["resid_post"], "poolings": ["mean", "last"]},
        "steering": {"experiments": {"e": base}},
    }


def test_resolve_experiment_checks_layers_and_sources():
    exp = R.resolve_experiment(_cfg(), "e", "m", {"m": [1, 3]}, {"m": 6})
    assert exp["layers"] == [1, 3] and exp["direction"]["pooling"] == "mean"
    with pytest.raises(ConfigError, match=r"steering\.experiments\.e\.layers.*\[2\]"):
        R.resolve_experiment(_cfg(layers=[1, 2]), "e", "m", {"m": [1, 3]}, {"m": 6})
    assert R.resolve_experiment(
        _cfg(layers=[2], direction={"source": "file", "path": "x.npy"}),
        "e",
        "m",
        {"m": [1, 3]},
        {"m": 6},
    )["layers"] == [2]
    with pytest.raises(ConfigError, match=r"direction\.task"):
        tv = {"source": "task_vector", "dataset": "t", "task": "max"}
        R.resolve_experiment(_cfg(direction=tv), "e", "m", {"m": [1]}, {"m": 6})
    with pytest.raises(ConfigError, match="exactly one of 'prompts'"):
        R.resolve_experiment(_cfg(dataset="d"), "e", "m", {"m": [1]}, {"m": 6})


def test_dry_run_schedules_steering_after_probes(tmp_path):
    work = copy_workflow(tmp_path)
    target = "results/figures/demo/steering_facts_truth.png"
    out = run_snakemake(work, target, "--forceall", "--dag").stdout
    nodes = dict(re.findall(r'(\d+)\[label = "([a-z_]+)', out))
    edges = re.findall(r"(\d+) -> (\d+)", out)
    into_steering = {nodes[a] for a, b in edges if nodes.get(b) == "steering"}
    assert {"train_probe"} <= into_steering
    assert any(nodes[a] == "steering" and nodes.get(b) == "plot_steering" for a, b in edges)
    dry = run_snakemake(work, "-n", "-p", "results/steering/demo/facts_truth/effects.csv").stdout
    for layer in (1, 3):
        assert f"results/probes/demo/facts_located_in/layer_{layer}.json" in dry


def test_dose_response_figure(tmp_path):
    from layerscope.plotting import plots

    rows = []
    for L in (1, 3):
        for a in (-1.0, 0.0, 1.0):
            for m in S.METRICS:
                v = a * L if m == "logit_diff" else abs(a) / 10
                rows.append(
                    dict(
                        layer=L,
                        alpha=a,
                        source="probe",
                        direction="probe",
                        metric=m,
                        value=v,
                        ci_low=v - 0.1,
                        ci_high=v + 0.1,
                        n=12,
                        beyond_random=a != 0,
                    )
                )
                rows.append(
                    dict(
                        layer=L,
                        alpha=a,
                        source="random",
                        direction="band",
                        metric=m,
                        value=0.0,
                        ci_low=-0.2,
                        ci_high=0.2,
                        n=10,
                        beyond_random=None,
                    )
                )
    effects = pd.DataFrame(rows)
    fig = plots._draw_steering_dose_response(effects, model="m", experiment="e")
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 6  # 3 metrics x 2 layers
    assert (
        "12 prompts" in fig._suptitle.get_text()
        and "10 random directions" in fig._suptitle.get_text()
    )
    written = plots.steering_dose_response(
        effects, tmp_path / "f.png", model="m", experiment="e", formats=("png", "svg")
    )
    assert [Path(p).name for p in written] == ["f.png", "f.svg"]
    with pytest.raises(ValueError, match="only random"):
        plots._draw_steering_dose_response(effects[effects["source"] == "random"])


def test_steering_job_end_to_end_is_reproducible(tmp_path):
    """The job's glue: a file direction, prompts with fixed targets, generation; two runs, same
    bytes."""
    np.save(tmp_path / "dir.npy", np.random.default_rng(3).standard_normal((6, 128)))
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt_id,prompt\na,The capital of France is\nb,The capital of Japan is\n")
    exp = {
        "prompts": str(prompts),
        "targets": {"positive": " Paris", "negative": " Tokyo"},
        "direction": {"source": "file", "path": str(tmp_path / "dir.npy")},
        "layers": [2],
        "alphas": [-0.5, 0.5],
        "hook": "resid_post",
        "positions": -1,
        "neutral": str(DATA / "neutral.txt"),
        "n_random": 10,
        "seed": 0,
        "max_new_tokens": 2,
    }
    model = {"source": str(DEMO), "dtype": "float32", "compatibility_mode": False, "bos": "auto"}
    outs = []
    for run in ("one", "two"):
        out = {
            k: tmp_path / run / f"{k}.{'json' if k == 'summary' else 'csv'}"
            for k in ("effects", "per_prompt", "norms", "generations", "summary")
        }
        files = {"prompts": prompts, "neutral": DATA / "neutral.txt", "path": tmp_path / "dir.npy"}
        summary = R.steering_experiment(
            files,
            out,
            model=model,
            experiment=exp,
            precision={},
            device="cpu",
            batch_size=64,
            threads=1,
            log=lambda m: None,
        )
        outs.append(out)
    assert summary["layers"] == [2] and summary["alphas"] == [-0.5, 0.0, 0.5]
    for k in outs[0]:
        assert outs[0][k].read_bytes() == outs[1][k].read_bytes(), k
    gens = pd.read_csv(outs[0]["generations"])
    assert len(gens) == 3 * 2 and set(gens["alpha"]) == {-0.5, 0.0, 0.5}
    assert gens[gens["alpha"] == 0]["starts_with_positive"].tolist() == [
        True,
        False,
    ]  # France -> Paris
    effects = pd.read_csv(outs[0]["effects"])
    assert (effects.loc[effects["alpha"] == 0, "value"] == 0).all()


class _HFEngine:
    """A minimal engine with the forward contract of the native engine (``return_type="output"``):
    plain HF GPT-2 tapped at ``blocks.L.hook_resid_post``. Used to test the KV-cache path of
    :func:`layerscope.interventions.steering.generate`, which the bridge cannot take (it returns an
    empty cache)."""

    def __init__(self, hf):
        self.model, self.cfg = hf, type("cfg", (), {"n_layers": 6, "d_model": 128})()
        self.hook_dict = {f"blocks.{L}.hook_resid_post": None for L in range(6)}
        self.device = next(hf.parameters()).device

    def hooks(self, fwd_hooks=()):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            handles = []
            for name, fn in fwd_hooks:
                block = self.model.transformer.h[int(name.split(".")[1])]

                def post(m, a, out, fn=fn):
                    return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)

                handles.append(block.register_forward_hook(post))
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()

        return ctx()

    def __call__(self, ids, attention_mask=None, return_type="logits", **kw):
        out = self.model(input_ids=ids, attention_mask=attention_mask, **kw)
        return out.logits if return_type == "logits" else out


def test_kv_cache_generation_equals_recompute(hf_demo, demo_prompts):
    engine = _HFEngine(hf_demo)
    vec = torch.as_tensor(np.random.default_rng(9).standard_normal(128) * 3.0, dtype=torch.float64)
    kw = dict(hook="blocks.2.hook_resid_post", vector=vec, position=-2)
    cached, used = S.generate(engine, demo_prompts.ids, 5, **kw)
    plain, not_used = S.generate(engine, demo_prompts.ids, 5, use_cache=False, **kw)
    assert used and not not_used
    assert cached == plain
    assert cached != S.generate(engine, demo_prompts.ids, 5, use_cache=False)[0]  # steering acts


def test_native_engine_steering_matches_plain_transformers(hf_demo, demo_prompts):
    """The native engine (the integrator's default) runs the same sweep code: alpha = 0 is bit for
    bit the
    unsteered run, steered logits equal a plain-transformers hook, and generation takes the KV
    cache."""
    from layerscope.engine.loading import load_engine

    engine, info = load_engine(str(DEMO), engine="native", components=["resid_post"], device="cpu")
    assert info["engine"] == "native"
    rows = demo_prompts.ids
    starts = S.row_starts([len(r) for r in rows], -3)
    vec = torch.as_tensor(np.random.default_rng(5).standard_normal(128) * 3.0, dtype=torch.float64)
    with torch.inference_mode():
        base = S.run_rows(engine, rows, None, None, None, batch_size=4, pad_id=0)
        zero = S.run_rows(
            engine, rows, "blocks.3.hook_resid_post", 0 * vec, starts, batch_size=4, pad_id=0
        )
        ours = S.run_rows(
            engine, rows, "blocks.3.hook_resid_post", vec, starts, batch_size=4, pad_id=0
        )
    assert all(torch.equal(a, b) for a, b in zip(base, zero))
    for r, st, lg in zip(rows, starts, ours):
        ref = _hf_steered_logits(hf_demo, r, 3, vec.float(), int(st))
        assert torch.allclose(lg, ref, atol=2e-4), (lg - ref).abs().max()
    toks, cached = S.generate(engine, rows[:3], 4, hook="blocks.2.hook_resid_post", vector=vec)
    assert cached
    assert (
        toks
        == S.generate(
            engine, rows[:3], 4, hook="blocks.2.hook_resid_post", vector=vec, use_cache=False
        )[0]
    )
