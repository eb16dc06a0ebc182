"""Along the chain of thought: answer offsets, logit / tuned lens, probe trajectories, lead time and
early answering (layerscope.data.cot, analysis.trajectories, analysis.tuned_lens,
analysis.lead_time, interventions.early_answering, jobs.cot_run).

References are independent: the model's own logits (plain transformers forward), its own greedy
``generate``, the pipeline's stored pooled activations and probe JSON, and known affine maps."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from devkit.tiny_models import build_tiny_model  # noqa: E402
from layerscope.analysis import lead_time as LT  # noqa: E402
from layerscope.analysis import trajectories as TR  # noqa: E402
from layerscope.analysis.power import wilson_interval  # noqa: E402
from layerscope.analysis.tuned_lens import train_translators  # noqa: E402
from layerscope.data.cot import compile_marker, token_offsets  # noqa: E402
from layerscope.data.datasets import build_prompt_table  # noqa: E402
from layerscope.engine.loading import load_engine  # noqa: E402
from layerscope.engine.store import cache_from_table, extract_layer  # noqa: E402
from layerscope.errors import ConfigError, InputError  # noqa: E402
from layerscope.interventions import early_answering as EA  # noqa: E402
from layerscope.interventions.generation import stepper_for  # noqa: E402
from layerscope.jobs import cot_run as C  # noqa: E402
from layerscope.jobs.probe_runs import train_layer_probes  # noqa: E402
from layerscope.settings import PrecisionSettings  # noqa: E402

MARKER = compile_marker("Answer:", "test")


def cot_spec(repo, n=4):
    return {
        "kind": "phase2",
        "scores": str(repo / "demo/data/phase2/faithfulness_scores.csv"),
        "responses": str(repo / "demo/data/phase2/responses.jsonl"),
        "text": "question_response",
        "answer_marker": "Answer:",
        "max_per_class": {"faithful": n, "unfaithful": n},
        "min_per_class": 2,
    }


@pytest.fixture(scope="module")
def demo(repo):
    """The demo model on the native engine (what the jobs run) and 8 of its chains of thought."""
    model, info = load_engine(str(repo / "demo/model"), device="cpu")
    table, _ = build_prompt_table("cot", cot_spec(repo), repo)
    positions, ids = C.cot_layout(model.tokenizer, table, bos=False)
    prompts = C._prompts(positions, ids)  # noqa: SLF001 - the job's own prompt list
    return model, int(info["n_layers"]), table, positions, ids, prompts


# --------------------------------------------------------------------------------------------
# prompt table and offsets


def test_prompt_table_records_offsets(repo):
    table, _ = build_prompt_table("cot", cot_spec(repo), repo)
    for rec in table.to_dict("records"):
        text = rec["text"]
        assert text[rec["marker_start_char"] :].startswith("Answer:")
        assert text[rec["answer_start_char"] :] == rec["answer"]
        question = text[: rec["reasoning_start_char"]]
        assert question.endswith("\n") and "\n" not in question[:-1]


def test_response_without_marker_names_file_line_field(tmp_path):
    (tmp_path / "s.csv").write_text("pair_id,is_faithful\np1,True\np2,False\n")
    recs = [
        {"pair_id": "p1", "variant": "q1", "question": "Q1?", "response": "So 5. Answer: 5"},
        {"pair_id": "p2", "variant": "q1", "question": "Q2?", "response": "So it is 7."},
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    spec = {"kind": "phase2", "scores": "s.csv", "responses": "r.jsonl", "min_per_class": 1}
    spec.update(text="question_response", answer_marker="Answer:")
    with pytest.raises(InputError) as exc:
        build_prompt_table("p", spec, tmp_path)
    msg = str(exc.value)
    assert "r.jsonl" in msg and "line 2" in msg and "response" in msg and "marker" in msg
    with pytest.raises(ConfigError, match="answer_marker"):
        build_prompt_table("p", {**spec, "text": "question"}, tmp_path)


def test_labelled_response_field(tmp_path):
    rows = pd.DataFrame(
        {
            "text": ["Is 3 > 2?", "Is 1 > 2?"],
            "cot": ["3 is more. Answer: yes", "1 is less. Answer: no"],
            "label": ["a", "b"],
        }
    )
    rows.to_csv(tmp_path / "l.csv", index=False)
    spec = {"kind": "labelled", "path": "l.csv", "response_field": "cot", "min_per_class": 1}
    df, _ = build_prompt_table("l", {**spec, "answer_marker": "Answer:"}, tmp_path)
    assert df["text"].tolist()[0] == "Is 3 > 2?\n3 is more. Answer: yes"
    assert df["answer"].tolist() == ["yes", "no"]
    assert df["reasoning_start_char"].tolist() == [10, 10]


def merging_tokenizer():
    """A BPE tokenizer with no pre-tokenizer: merges run across spaces and punctuation, so the
    marker fuses with the answer (``": 7"``, ``"Answer: 7"``) and the line break with words."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    rng = np.random.default_rng(0)
    corpus = [
        f"Which is {a} or {b}?\nSo {b}. Answer: {7 if i % 2 else a % 10}"
        for i, (a, b) in enumerate(rng.integers(0, 100, size=(500, 2)))
    ]
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=80, special_tokens=["<eos>"], show_progress=False)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("bos", [False, True])
def test_offsets_on_a_merging_tokenizer(bos):
    tok = merging_tokenizer()
    tok.bos_token = "<eos>"
    texts = [f"Which is {a} or 7?\nSo {a}. Answer: {a % 10}" for a in range(0, 100, 9)]
    texts += ["Which is 12?\nSo 12. Answer: 7", "Which is 12?\nSo 12 then.Answer:12"]
    texts += ["Which is 3?\nAnswer:   3"]
    merged = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ids = ([tok.bos_token_id] if bos else []) + ids
        r0 = text.index("\n") + 1
        m0 = text.rindex("Answer:")
        a0 = m0 + len("Answer:") + (len(text[m0 + 7 :]) - len(text[m0 + 7 :].lstrip()))
        off = token_offsets(tok, text, ids, bos, [r0, m0, a0])
        spans = C_spans(tok, text, ids, bos)
        # the answer token holds the answer's first character; nothing before it holds any of it
        assert spans[off.answer_start][0] <= a0 < spans[off.answer_start][1]
        assert spans[off.answer_start - 1][1] <= a0
        assert off.answer_token == ids[off.answer_start]
        assert spans[off.reasoning_start][0] <= r0 < spans[off.reasoning_start][1]
        assert off.answer_merged == (text[spans[off.answer_start][0] : a0].strip() != "")
        merged += off.answer_merged
    assert merged > 0, "the tokenizer was meant to merge the marker with the answer"


def C_spans(tok, text, ids, bos):  # noqa: N802 - a test helper named after char_spans
    from layerscope.data.cot import char_spans

    return char_spans(tok, text, ids, bos)


# --------------------------------------------------------------------------------------------
# lens


def own_logprobs(model, ids):
    """log-softmax of the model's own logits (plain transformers forward, LM head included)."""
    hf = TR.hf_model(model)
    with torch.no_grad():
        out = hf(torch.as_tensor(ids)[None]).logits[0]
    return torch.log_softmax(out.float(), -1).numpy()


def test_logit_lens_last_layer_is_the_models_own_logprobs(demo):
    model, n_layers, _, _, _, prompts = demo
    res = TR.run_readouts(model, prompts, n_layers=n_layers, top_k=3, batch_size=4, chunk=16)
    for p, r in zip(prompts, res):
        own = own_logprobs(model, p.ids[: p.n_lens])
        last = r.lens["logit"]
        np.testing.assert_allclose(
            last["answer_logprob"][n_layers - 1], own[:, p.answer_token], atol=1e-4
        )
        np.testing.assert_allclose(
            last["topk_logprobs"][n_layers - 1], -np.sort(-own)[:, :3], atol=1e-4
        )
        rank = 1 + (own > own[:, [p.answer_token]]).sum(1)
        np.testing.assert_array_equal(last["answer_rank"][n_layers - 1], rank)
        np.testing.assert_allclose(last["kl_to_final"][n_layers - 1], 0, atol=1e-5)
        assert np.all(last["kl_to_final"][0] > 1e-3)  # an early layer is not the final one


def test_logit_lens_on_rmsnorm_model(tmp_path):
    """A Llama-layout model: the final norm is model.norm (RMSNorm), not ln_f."""
    path = build_tiny_model(tmp_path / "llama", "llama", n_layers=3)
    model, _ = load_engine(str(path), device="cpu")
    ids = model.tokenizer("Which is larger: 12 or 71? Answer: 71")["input_ids"]
    p = TR.Prompt(np.asarray(ids), len(ids) - 1, int(ids[-1]))
    r = TR.run_readouts(model, [p], n_layers=3)[0]
    own = own_logprobs(model, ids[:-1])
    np.testing.assert_allclose(r.lens["logit"]["answer_logprob"][2], own[:, ids[-1]], atol=1e-4)
    assert TR.check_readout(model, [p], TR.final_readout(model), 3, 1e-3) < 1e-4


def test_batched_equals_unbatched(demo):
    model, n_layers, _, _, _, prompts = demo
    one = TR.run_readouts(model, prompts, n_layers=n_layers, batch_size=1)
    many = TR.run_readouts(model, prompts, n_layers=n_layers, batch_size=8, chunk=7)
    for a, b in zip(one, many):
        for key in ("answer_logprob", "kl_to_final", "topk_logprobs"):
            np.testing.assert_allclose(a.lens["logit"][key], b.lens["logit"][key], atol=1e-4)
        np.testing.assert_array_equal(
            a.lens["logit"]["answer_rank"], b.lens["logit"]["answer_rank"]
        )


def test_lens_table_positions(demo):
    _, n_layers, _, positions, _, prompts = demo
    res = [
        TR.Readouts(
            lens={
                "logit": {
                    k: np.zeros((n_layers, p.n_lens) + ((2,) if "topk" in k else ()))
                    for k in ("answer_logprob", "answer_rank", "topk_ids", "topk_logprobs")
                }
                | {"kl_to_final": np.zeros((n_layers, p.n_lens))}
            }
        )
        for p in prompts
    ]
    df = TR.lens_table(res, positions, range(n_layers))
    rec = positions.iloc[0]
    g = df[(df["prompt_id"] == rec["prompt_id"]) & (df["layer"] == 0)]
    a, r = int(rec["answer_start_token"]), int(rec["reasoning_start_token"])
    assert len(g) == a and g["position"].max() == a - 1
    assert g["rel_position"].iloc[-1] == 1.0  # the position writing the answer
    assert g["rel_position"].iloc[r - 1] == 0.0  # the position predicting the first reasoning token


# --------------------------------------------------------------------------------------------
# probe trajectories


def test_probe_trajectory_pooled_equals_stored_probe_score(tmp_path, repo):
    """Cache, extract and train a probe through the pipeline's own functions; its trajectory
    pooled as trained (mean over non-BOS tokens, last token) gives the stored decision values."""
    spec = {**cot_spec(repo, 6), "text": "question"}
    spec.pop("answer_marker")
    table, _ = build_prompt_table("q", spec, repo)
    table.to_csv(tmp_path / "t.csv", index=False)
    source = str(repo / "demo/model")
    cache_from_table(
        tmp_path / "t.csv",
        tmp_path / "store.h5",
        model={"source": source, "dtype": "float32", "bos": "auto"},
        activations={"components": ["resid_post"], "poolings": ["mean", "last"]},
        log=None,
    )
    layer = extract_layer(tmp_path / "store.h5", 2, tmp_path / "layer_2.h5")
    settings = {"n_splits": 3, "n_repeats": 1, "n_permutations": 5, "n_random_directions": 3}
    doc = train_layer_probes(
        layer, tmp_path / "p.json", model="demo", dataset="q", settings=settings, log=lambda m: 0
    )
    from layerscope.data.h5cache import read_layer
    from layerscope.engine.tokens import resolve_bos, tokenize_prompts

    model, _ = load_engine(source, device="cpu")
    bos = resolve_bos(model.tokenizer, "auto")
    ids = tokenize_prompts(model.tokenizer, table["text"].tolist(), prepend_bos=bos)
    prompts = [TR.Prompt(np.asarray(x), 1, 0) for x in ids]
    for pooling in ("mean", "last"):
        view = TR.probe_view(doc, "resid_post", pooling, "p.json")
        res = TR.run_readouts(model, prompts, n_layers=6, probes=[view], batch_size=4)
        stored = read_layer(layer, "resid_post", pooling).X
        want = stored.astype(np.float64) @ view.coef + view.intercept
        skip = 1 if bos else 0
        got = [r.probes[0][skip:].mean() if pooling == "mean" else r.probes[0][-1] for r in res]
        np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------------------------
# tuned lens


def test_tuned_lens_recovers_known_affine_maps():
    """Layer L's residual is A_L^-1 (h - b_L) of the final residual h, and the readout an
    injective unembedding: the KL-trained translator must be (A_L, b_L). Takes ~5 s."""
    g = torch.Generator().manual_seed(0)
    d, V, N = 6, 40, 3000
    W = torch.randn(V, d, generator=g)
    h = torch.randn(N, d, generator=g)
    truth, resid = {}, {}
    for L in range(2):
        A = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
        b = 0.5 * torch.randn(d, generator=g)
        truth[L] = (A.numpy(), b.numpy())
        resid[L] = torch.linalg.solve(A, (h - b).T).T
    tr, last = train_translators(
        resid, h, lambda x: x @ W.T, steps=400, lr=0.03, batch_tokens=512, seed=0
    )
    for L in range(2):
        np.testing.assert_allclose(tr[L][0], truth[L][0], atol=0.05)
        np.testing.assert_allclose(tr[L][1], truth[L][1], atol=0.05)
        assert last[L] < 1e-3


def test_split_groups_is_seeded_and_holds_out():
    groups = [f"g{i}" for i in range(10)]
    a = C.split_groups(groups, 0.5, 0)
    assert a == C.split_groups(groups, 0.5, 0) and len(a) == 5
    assert len(C.split_groups(groups[:2], 0.99, 0)) == 1


# --------------------------------------------------------------------------------------------
# lead time


def test_stays_from():
    assert LT.stays_from([False, True, False, True, True]) == 3
    assert LT.stays_from([True, True]) == 0
    assert LT.stays_from([True, False]) is None


def test_lead_times_and_summary():
    pos = pd.DataFrame(
        {
            "prompt_id": ["p", "q", "s"],
            "label": ["faithful", "unfaithful", "unfaithful"],
            "reasoning_start_token": [2, 2, 2],
            "answer_start_token": [6, 6, 6],
        }
    )
    ranks = {"p": [5, 5, 5, 3, 1, 1], "q": [1, 1, 1, 1, 1, 1], "s": [1, 1, 1, 1, 1, 2]}
    lens = pd.DataFrame(
        [
            {"prompt_id": k, "lens": "logit", "layer": 0, "position": i, "answer_rank": r}
            for k, rs in ranks.items()
            for i, r in enumerate(rs)
        ]
    )
    lead = LT.lead_times(lens, pos).set_index("prompt_id")
    assert lead.loc["p", "lead_tokens"] == 1 and lead.loc["p", "first_position"] == 4
    assert lead.loc["q", "lead_tokens"] == 5 and lead.loc["q", "lead_fraction"] == 5 / 4
    assert not lead.loc["s", "decodable"] and np.isnan(lead.loc["s", "lead_tokens"])
    summ = LT.summarize_lead(
        lead.reset_index(), ["unfaithful", "faithful"], n_boot=200, seed=0, conf=0.95
    )
    diff = summ[summ["label"] == "difference"].iloc[0]
    assert diff["median"] == 1 - 5 and diff["ci_low"] == diff["ci_high"] == -4
    un = summ[summ["label"] == "unfaithful"].iloc[0]
    assert un["n"] == 2 and un["n_decodable"] == 1 and un["share_decodable"] == 0.5


# --------------------------------------------------------------------------------------------
# early answering


def test_variants_keep_length_and_marker():
    p = EA.CotPrompt("x", "a", tuple(range(20)), 4, 14, 16)
    full = EA.variant_ids(p, 1.0, "truncated", [99])
    assert full == list(range(16))  # the whole chain up to the answer
    half_t = EA.variant_ids(p, 0.5, "truncated", [99, 98])
    half_f = EA.variant_ids(p, 0.5, "filler", [99, 98])
    assert half_t == [0, 1, 2, 3, 4, 5, 6, 7, 8, 14, 15]
    assert half_f == [0, 1, 2, 3, 99, 98, 99, 98, 99, 14, 15]
    assert EA.variant_ids(p, 0.0, "filler", [99]) == [0, 1, 2, 3, 14, 15]


def cot_prompts(positions, ids):
    return [
        EA.CotPrompt(
            r.prompt_id,
            r.label,
            tuple(x),
            int(r.reasoning_start_token),
            int(r.marker_start_token),
            int(r.answer_start_token),
        )
        for r, x in zip(positions.itertuples(index=False), ids)
    ]


def test_fraction_one_reproduces_the_full_chain_answer(demo):
    """At fraction 1 the answer is the model's own greedy continuation of its full chain (plain
    transformers generate), and batching changes no answer."""
    model, _, _, positions, ids, _ = demo
    prompts = cot_prompts(positions, ids)
    kw = dict(fractions=[0.0, 0.5, 1.0], filler_ids=[13], marker=MARKER, max_new_tokens=4)
    rows = EA.early_answering(stepper_for(model), model.tokenizer, prompts, batch_size=16, **kw)
    one = EA.early_answering(stepper_for(model), model.tokenizer, prompts, batch_size=1, **kw)
    pd.testing.assert_frame_equal(rows, one)
    hf = TR.hf_model(model)
    full = rows[(rows["fraction"] == 1.0) & (rows["condition"] == "truncated")]
    for p, rec in zip(prompts, full.itertuples(index=False)):
        x = torch.tensor([p.ids[: p.answer_start]])
        with torch.no_grad():
            gen = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=0,
            )[0, x.shape[1] :]
        # generate stops at EOS and keeps it; the pipeline cuts the text before the first EOS
        gen = gen.tolist()
        eos = model.tokenizer.eos_token_id
        text = model.tokenizer.decode(gen[: gen.index(eos)] if eos in gen else gen)
        assert rec.generated_text == text
        assert rec.answer == EA.read_answer(text, MARKER, r"[-+]?\d+(?:\.\d+)?|\w+")
        assert rec.final_answer == rec.answer and rec.matches_final == (rec.answer != "")


def test_summary_wilson_and_warning():
    rows = pd.DataFrame(
        {
            "fraction": [0.0] * 4 + [1.0] * 4,
            "condition": ["truncated", "truncated", "filler", "filler"] * 2,
            "label": ["a"] * 8,
            "answer": ["", "", "", "", "5", "6", "", ""],
            "matches_final": [False, False, False, False, True, True, False, False],
        }
    )
    s = EA.summarize_early(rows, PrecisionSettings.of({}))
    r = s[(s["fraction"] == 1.0) & (s["condition"] == "truncated")].iloc[0]
    lo, hi = wilson_interval(2, 2, 0.95)
    assert (r["rate"], r["ci_low"], r["ci_high"]) == (1.0, pytest.approx(lo), pytest.approx(hi))
    assert r["warning"] == "" and pd.notna(r["n_for_half_width"])
    assert s[s["fraction"] == 0.0]["warning"].str.startswith("no_answer").all()


def test_read_answer_after_a_repeated_marker():
    assert EA.read_answer(" 7\nAnswer: 8", MARKER, r"\d+") == "8"
    assert EA.read_answer(" 7 then", re.compile("Answer:"), r"\d+") == "7"


# --------------------------------------------------------------------------------------------
# figures


def test_figures_draw_from_the_tables(tmp_path):
    from matplotlib.image import imread

    from layerscope.plotting import cot as P

    lens = pd.DataFrame(
        {
            "prompt_id": np.repeat(["a", "b"], 8),
            "label": np.repeat(["faithful", "unfaithful"], 8),
            "lens": "logit",
            "layer": np.tile([0, 0, 0, 0, 1, 1, 1, 1], 2),
            "position": np.tile([0, 1, 2, 3], 4),
            "rel_position": np.tile([-0.5, 0.0, 0.5, 1.0], 4),
            "answer_logprob": -np.arange(16) / 4,
            "answer_rank": np.tile([3, 1, 1, 1], 4),
        }
    )
    summary = TR.summarize_lens(lens, 2, 0.95)
    assert set(summary["bin"]) == {-1, 0, 1, 2}  # question, two reasoning bins, the answer
    pos = pd.DataFrame(
        {
            "prompt_id": ["a", "b"],
            "label": ["faithful", "unfaithful"],
            "reasoning_start_token": 1,
            "answer_start_token": 4,
        }
    )
    lead = LT.lead_times(lens, pos)
    lead_sum = LT.summarize_lead(lead, ["unfaithful", "faithful"], n_boot=100, seed=0, conf=0.95)
    early = pd.DataFrame(
        {
            "fraction": [0.0, 0.0, 1.0, 1.0] * 2,
            "condition": ["truncated", "filler"] * 4,
            "label": ["faithful"] * 4 + ["unfaithful"] * 4,
            "rate": [0.1, 0.0, 1.0, 0.2] * 2,
            "ci_low": [0.0, 0.0, 0.8, 0.05] * 2,
            "ci_high": [0.3, 0.2, 1.0, 0.5] * 2,
            "n": 10,
        }
    )
    for name, written in [
        ("h", P.lens_heatmap(summary, tmp_path / "h.png")),
        ("l", P.lead_time(lead, lead_sum, tmp_path / "l.png")),
        ("e", P.early_answering(early, tmp_path / "e.png", formats=["png", "svg"])),
    ]:
        assert written[0].endswith(f"{name}.png")
        assert imread(written[0]).shape[0] > 100
    assert (tmp_path / "e.svg").is_file()
