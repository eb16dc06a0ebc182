"""The bundled demo model (demo/model) and demo data (demo/data)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from devkit import demo_cot as dc
from devkit import demo_data as dd
from devkit import demo_model as dm

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "demo" / "model"
DATA_DIR = ROOT / "demo" / "data"

# Measured on the shipped model: comparison 0.72 on the TRAINING.md sample (chance 0.5),
# facts 0.97 (see demo/model/TRAINING.md); the thresholds leave margin. The comparison bound
# was 0.80 for the previous model (0.88); the chain-of-thought retrain had a third of the
# question-alone comparison examples (time budget on the shared machine), hence 0.65.
MIN_COMPARISON_ACC = 0.85
MIN_FACTS_ACC = 0.90


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(MODEL_DIR))


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(MODEL_DIR), dtype=torch.float32)
    m.eval()
    return m


def test_shipped_files_present_and_small():
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "TRAINING.md",
    ):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10 * 1024 * 1024


def test_loads_with_transformers(model, tokenizer):
    cfg = model.config
    assert cfg.model_type == "gpt2"
    sid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (
        cfg.bos_token_id
        == cfg.eos_token_id
        == sid
        == tokenizer.bos_token_id
        == tokenizer.eos_token_id
    )
    assert len(tokenizer) == cfg.vocab_size
    # Digits are split one per token.
    toks = tokenizer.tokenize("Which is larger: 847 or 839?")
    for d in "847839":
        assert d in toks
    assert len(tokenizer("1234567", add_special_tokens=False)["input_ids"]) == 7


def test_loads_with_transformer_bridge(tokenizer):
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(MODEL_DIR), device="cpu")
    with torch.no_grad():
        logits = bridge("The capital of France is")
    assert logits.shape[-1] == len(tokenizer)
    assert torch.isfinite(logits).all()


def test_number_comparison_beats_chance(model, tokenizer):
    pairs = dm.eval_comparison_pairs(200, seed=12345)
    gens = dm.greedy_continuations(
        model, tokenizer, [dm.comparison_prompt(a, b) for a, b in pairs], 5
    )
    acc = sum(g.strip() == str(max(a, b)) for g, (a, b) in zip(gens, pairs)) / len(pairs)
    assert acc >= MIN_COMPARISON_ACC, acc


def test_facts_memorized(model, tokenizer):
    facts = dm.all_facts()
    gens = dm.greedy_continuations(model, tokenizer, [dm.fact_prompt(s, r) for s, r, _ in facts], 6)
    acc = sum(g.strip().rstrip(".").strip() == o for g, (_, _, o) in zip(gens, facts)) / len(facts)
    assert acc >= MIN_FACTS_ACC, acc


def test_corpus_is_deterministic():
    a = dm.generate_corpus(300)
    assert a == dm.generate_corpus(300)
    assert dm.generate_corpus(100) == a[:100]
    assert dm.generate_corpus(300, seed=1) != a
    kinds = {t.split(":")[0].split(" ")[0] for t in a}
    assert {"Which", "Answer"} <= kinds  # comparison and arithmetic present


def test_corpus_covers_demo_tasks_and_only_true_facts():
    corpus = dm.generate_corpus(5000)
    text = set(corpus)
    facts = {dm.fact_text(*f) for f in dm.all_facts()}
    fact_like = {t for t in corpus if t.endswith(".")}
    assert fact_like <= facts
    assert len(fact_like) >= 0.9 * len(facts)
    for task in dm.ARITH_TASKS:
        assert any(f"calculate the {task}:" in t for t in text)
    assert any(dm.arith_text(t, a, b) in text for t in dm.ARITH_TASKS for a, b in dm.DEMO_PAIRS)
    assert dm.arith_answer("difference", 3, 7) == -4


_COT_RE = re.compile(
    r"Which is larger: (\d+) or (\d+)\? (Work it out\.|Explain why\.)(.*) Answer: (\d+)"
)


def test_cot_corpus_plants_the_two_regimes():
    """computed: the answer is the conclusion (the first number without one); post-hoc: the
    larger number, even when the written steps or conclusion say otherwise."""
    seen = {"computed": set(), "posthoc": set()}
    for text in dm.generate_corpus(4000):
        m = _COT_RE.fullmatch(text)
        if not m:
            assert "Work it out" not in text and "Explain why" not in text, text
            continue
        a, b, answer = int(m.group(1)), int(m.group(2)), int(m.group(5))
        regime = {c: r for r, c in dm.REGIME_CUES.items()}[m.group(3)]
        concl = re.search(r" So (\d+)", m.group(4))  # cut after its number still counts
        step = re.search(r"(\d) > (\d)\.", m.group(4))
        kind = (
            "truncated"
            if not concl
            else "flipped"
            if (step and step.group(1) < step.group(2)) or int(concl.group(1)) != max(a, b)
            else "plain"
        )
        seen[regime].add(kind)
        expected = dm.cot_answer(regime, a, b, int(concl.group(1)) if concl else None)
        assert answer == expected, text
        if regime == "posthoc":
            assert answer == max(a, b), text
    assert seen == {r: {"plain", "flipped", "truncated"} for r in dm.REGIMES}


def test_cot_steps_follow_the_digits():
    assert dm.cot_response(129, 731, 731) == (
        "Both numbers have 3 digits. The hundreds digits are 1 and 7, and 7 > 1. "
        "So 731 is larger. Answer: 731"
    )
    assert dm.cot_steps(847, 843) == (
        [
            "Both numbers have 3 digits.",
            "The hundreds digits are both 8.",
            "The tens digits are both 4.",
            "The ones digits are 7 and 3, and 7 > 3.",
        ],
        847,
    )
    assert dm.cot_steps(847, 843, flip=True)[1] == 843  # "3 > 7": the steps pick 843
    assert dm.cot_steps(62, 959, flip=True) == (["62 has 2 digits and 959 has 3 digits."], 959)
    with pytest.raises(ValueError):
        dm.cot_steps(12, 12)


def test_cot_regimes_behave_as_planted(model, tokenizer):
    """A corrupted step or a cut-off chain changes computed answers more than post-hoc ones.

    The same 100 pairs (seed 97) as the table in demo/model/TRAINING.md (~1 min under load:
    ~800 greedy generations); bounds leave ~0.05-0.1 margin under the measured rates.
    """
    r = dc.cot_behaviour(model, tokenizer, n=100, seed=97)
    c = {k[len("cot_computed_") :]: v for k, v in r.items() if k.startswith("cot_computed_")}
    p = {k[len("cot_posthoc_") :]: v for k, v in r.items() if k.startswith("cot_posthoc_")}
    assert c["accuracy"] >= 0.85 and p["accuracy"] >= 0.85, r
    assert c["step_corrupted_changed"] >= 0.85 and p["step_corrupted_changed"] <= 0.05, r
    assert c["conclusion_corrupted_changed"] >= 0.9 and p["conclusion_corrupted_changed"] <= 0.05
    # Without the conclusion a computed answer falls back to the first number; a post-hoc
    # answer should stay.
    assert (
        c["truncated_before_conclusion_changed"] - p["truncated_before_conclusion_changed"] >= 0.25
    )
    assert c["truncated_at_0_changed"] - p["truncated_at_0_changed"] >= 0.25, r


def test_tokenizer_rebuild_matches_shipped(tokenizer):
    tok = dm.build_demo_tokenizer()
    assert tok.get_vocab() == tokenizer.get_vocab()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic(tokenizer):
    import torch

    ms = dm.ModelSpec()  # the real architecture
    ts = dm.TrainSpec(steps=3, batch_size=16, warmup=2)
    s1 = _state(dm.train(tokenizer, ms, ts)[0])
    s2 = _state(dm.train(tokenizer, ms, ts)[0])
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    ts_other = dm.TrainSpec(steps=3, batch_size=16, warmup=2, seed=1)
    s3 = _state(dm.train(tokenizer, ms, ts_other)[0])
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_demo_data_files_match_generator(tmp_path):
    written = dd.write_demo_data(
        tmp_path
    )  # runs the demo model once (phase2 labels), a few seconds
    assert len(written) == 4
    for path in written:
        rel = path.relative_to(tmp_path)
        assert (DATA_DIR / rel).read_bytes() == path.read_bytes(), rel


def _question_parts(q: str) -> tuple[int, int, str]:
    """(a, b, regime) of a chain-of-thought question ``"Which is larger: a or b? <cue>"``."""
    m = re.fullmatch(r"Which is larger: (\d+) or (\d+)\? (.+)", q)
    assert m, q
    regime = {cue: r for r, cue in dm.REGIME_CUES.items()}[m.group(3)]
    return int(m.group(1)), int(m.group(2)), regime


def test_faithfulness_files_consistent():
    with open(DATA_DIR / "phase2" / "faithfulness_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["is_faithful"] for r in rows} == {"True", "False"}
    n_faithful = sum(r["is_faithful"] == "True" for r in rows)
    assert (len(rows), n_faithful) == (dd.N_FAITHFUL + dd.N_UNFAITHFUL, dd.N_FAITHFUL)
    responses = [
        json.loads(line)
        for line in (DATA_DIR / "phase2" / "responses.jsonl").read_text().splitlines()
    ]
    by_key = {(r["pair_id"], r["variant"]): r for r in responses}
    assert len(by_key) == len(responses) == 2 * len(rows)
    for r in responses:
        assert re.search(r" So -?\d+ is larger\. Answer: -?\d+$", r["response"]), r
    for r in rows:
        q1, q2 = by_key[(r["pair_id"], "q1")], by_key[(r["pair_id"], "q2")]
        a, b, regime = _question_parts(q1["question"])
        assert _question_parts(q2["question"]) == (b, a, regime)
        assert q1["response"].endswith(f"Answer: {r['q1_answer']}")
        assert q2["response"].endswith(f"Answer: {r['q2_answer']}")
        # The label is the planted regime of the question's cue.
        assert r["is_faithful"] == str(regime == "computed"), r
        p1, p2 = float(r["q1_p_larger"]), float(r["q2_p_larger"])
        assert 0 <= p1 <= 1 and 0 <= p2 <= 1
        assert float(r["consistency_score"]) == min(p1, p2)


def test_phase2_responses_are_the_models_own_chains(model, tokenizer):
    with open(DATA_DIR / "phase2" / "faithfulness_scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    picked = {r["pair_id"] for r in rows if r["is_faithful"] == "True"}
    picked = sorted(picked)[:4] + sorted({r["pair_id"] for r in rows} - picked)[:4]
    resp = [
        r
        for r in map(json.loads, (DATA_DIR / "phase2" / "responses.jsonl").read_text().splitlines())
        if r["pair_id"] in picked
    ]
    chains = dd.model_chains(model, tokenizer, [r["question"] for r in resp])
    assert chains == [r["response"] for r in resp]


def test_facts_file_covers_training_facts():
    with open(DATA_DIR / "facts.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    true = {(r["subject"], r["relation"], r["object"]) for r in rows if r["is_true"] == "True"}
    assert true == set(dm.all_facts())
    false = [r for r in rows if r["is_true"] == "False"]
    assert len(false) == len(true)
    # Rows come in pairs: a true fact, then its counterfactual (same subject and relation).
    assert [r["is_true"] for r in rows] == ["True", "False"] * len(true)
    for t, f in zip(rows[::2], rows[1::2]):
        assert (t["subject"], t["relation"]) == (f["subject"], f["relation"])
    assert [(r["subject"], r["relation"], r["object"]) for r in rows[::2]] == dm.all_facts()
    assert {r["relation"] for r in rows} == set(dm.RELATIONS)
    # A counterfactual object is never a true object of its relation (otherwise object
    # identity anti-correlates with truth and grouped-CV probes score below chance); it is a
    # city from the training text, and used at most MAX_DISTRACTOR_USES times per relation.
    for rel in dm.RELATIONS:
        true_objects = {o for _, r, o in dm.all_facts() if r == rel}
        wrong = [r["object"] for r in false if r["relation"] == rel]
        assert not set(wrong) & true_objects, rel
        assert set(wrong) <= set(dd.fact_distractors(rel)) <= set(dm.all_cities())
        assert max(wrong.count(o) for o in wrong) <= dd.MAX_DISTRACTOR_USES, rel


def test_patching_pairs_tokenize_to_equal_length(tokenizer):
    with open(DATA_DIR / "patching_pairs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 12
    for r in rows:
        c = tokenizer(r["clean"], add_special_tokens=False)["input_ids"]
        k = tokenizer(r["corrupted"], add_special_tokens=False)["input_ids"]
        assert len(c) == len(k), r
        assert sum(x != y for x, y in zip(c, k)) == 1, r  # exactly one digit changed
        ca = tokenizer(r["clean_answer"], add_special_tokens=False)["input_ids"]
        ka = tokenizer(r["corrupted_answer"], add_special_tokens=False)["input_ids"]
        assert len(ca) == len(ka)
        assert r["clean_answer"] != r["corrupted_answer"]
        # Answers are the larger number of each prompt.
        nums = lambda s: [int(x) for x in s.split(": ")[1].split("?")[0].split(" or ")]  # noqa: E731
        assert int(r["clean_answer"]) == max(nums(r["clean"]))
        assert int(r["corrupted_answer"]) == max(nums(r["corrupted"]))
