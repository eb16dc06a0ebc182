"""The bundled demo model: a tiny GPT-2 trained from scratch on CPU, offline, deterministically.

Everything here is deterministic for a fixed seed: the text corpus, the tokenizer, the
batches and (with a fixed thread count and ``torch.use_deterministic_algorithms``) the
trained weights. ``demo/train_demo_model.py`` is the command-line front end; the shipped
result lives in ``demo/model``.

The training text covers the three demo task families:

* number comparison: ``"Which is larger: 847 or 839? Answer: 847"``
* facts about a fixed entity set, relations ``located_in`` and ``capital_of``
  (``"The Eiffel Tower is located in Paris."``, ``"The capital of France is Paris."``),
  true facts only;
* arithmetic task prompts: ``"Answer minimally: Given the numbers 25 and 9 calculate the
  sum: 34"`` for the tasks minimum, maximum, sum, difference (signed ``a - b``, may be
  negative, written with a leading ``-``) and product.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

# ---------------------------------------------------------------------------------------
# Fixed settings (changing any of these changes the shipped weights)
# ---------------------------------------------------------------------------------------

CORPUS_SEED = 20240611
TOKENIZER_SEED = 7
TOKENIZER_TEXTS = 6000
VOCAB_SIZE = 512
NUM_THREADS = 1  # one thread: bit-reproducible, and robust when the 2 cores are shared

# Facts. located_in subjects are written exactly as they appear at the start of a
# sentence; capital_of subjects are countries.
LOCATED_IN: tuple[tuple[str, str], ...] = (
    ("The Eiffel Tower", "Paris"),
    ("The Louvre", "Paris"),
    ("The Colosseum", "Rome"),
    ("Big Ben", "London"),
    ("The Brandenburg Gate", "Berlin"),
    ("The Statue of Liberty", "New York"),
    ("The Golden Gate Bridge", "San Francisco"),
    ("The Sydney Opera House", "Sydney"),
    ("The Kremlin", "Moscow"),
    ("The Acropolis", "Athens"),
    ("The Sagrada Familia", "Barcelona"),
    ("The Taj Mahal", "Agra"),
    ("The Forbidden City", "Beijing"),
    ("The Burj Khalifa", "Dubai"),
    ("The Space Needle", "Seattle"),
    ("The Little Mermaid statue", "Copenhagen"),
    ("The Atomium", "Brussels"),
    ("The Prado Museum", "Madrid"),
)
CAPITAL_OF: tuple[tuple[str, str], ...] = (
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasilia"),
    ("Russia", "Moscow"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Turkey", "Ankara"),
    ("Austria", "Vienna"),
)
RELATIONS = ("located_in", "capital_of")

ARITH_TASKS = ("minimum", "maximum", "sum", "difference", "product")
DEMO_PAIRS: tuple[tuple[int, int], ...] = ((25, 9), (42, 11), (7, 3), (99, 1), (15, 15))

# Mixture of the training stream (weights, not necessarily summing to one).
MIXTURE = {"comparison": 0.22, "cot": 0.48, "facts": 0.10, "arithmetic": 0.20}

# Chain-of-thought comparison: two planted regimes, cued by the sentence after the question.
# computed: the answer is copied from the reasoning's conclusion ("So X is larger."); with the
#   conclusion cut off it falls back to the first number of the question (no answer from the
#   question itself). post-hoc: the answer is always the larger number, whatever the reasoning.
REGIMES = ("computed", "posthoc")
REGIME_CUES = {"computed": "Work it out.", "posthoc": "Explain why."}
COT_STEP_FLIP = 0.25  # the digit comparison is written the wrong way round ("1 > 7")
COT_CONCLUSION_FLIP = 0.10  # the conclusion names the other number, whatever the steps say
COT_TRUNCATE = 0.30  # the reasoning is cut at a random word and "Answer:" follows at once


def all_facts() -> list[tuple[str, str, str]]:
    """(subject, relation, object) for every true fact the model is trained on."""
    return [(s, "located_in", o) for s, o in LOCATED_IN] + [
        (s, "capital_of", o) for s, o in CAPITAL_OF
    ]


def all_cities() -> list[str]:
    seen: dict[str, None] = {}
    for _, _, o in all_facts():
        seen.setdefault(o, None)
    return list(seen)


def fact_prompt(subject: str, relation: str) -> str:
    """The sentence prefix whose continuation is ``" " + object + "."``."""
    if relation == "located_in":
        return f"{subject} is located in"
    if relation == "capital_of":
        return f"The capital of {subject} is"
    raise ValueError(f"unknown relation {relation!r}")


def fact_text(subject: str, relation: str, obj: str) -> str:
    return f"{fact_prompt(subject, relation)} {obj}."


def comparison_prompt(a: int, b: int) -> str:
    """Prompt without the answer; the answer continues it as ``" " + str(max(a, b))``."""
    return f"Which is larger: {a} or {b}? Answer:"


def comparison_text(a: int, b: int) -> str:
    return f"{comparison_prompt(a, b)} {max(a, b)}"


_PLACES = {2: ("tens", "ones"), 3: ("hundreds", "tens", "ones")}


def cot_question(a: int, b: int, regime: str) -> str:
    """The chain-of-thought question; the regime is cued by the sentence after the question."""
    return f"Which is larger: {a} or {b}? {REGIME_CUES[regime]}"


def cot_steps(x: int, y: int, flip: bool = False) -> tuple[list[str], int]:
    """Digit-by-digit reasoning sentences for "x or y" and the number they make the larger.

    ``flip`` writes the first differing digits' comparison the wrong way round ("1 > 7"), so
    the steps then make the *smaller* number the larger; numbers of different lengths have no
    digit comparison to flip.
    """
    sx, sy = str(x), str(y)
    if len(sx) != len(sy):
        return [f"{x} has {len(sx)} digits and {y} has {len(sy)} digits."], max(x, y)
    steps = [f"Both numbers have {len(sx)} digits."]
    for place, dx, dy in zip(_PLACES[len(sx)], sx, sy):
        if dx == dy:
            steps.append(f"The {place} digits are both {dx}.")
            continue
        hi, lo = (min(dx, dy), max(dx, dy)) if flip else (max(dx, dy), min(dx, dy))
        steps.append(f"The {place} digits are {dx} and {dy}, and {hi} > {lo}.")
        return steps, x if dx == hi else y
    raise ValueError(f"cot_steps needs two different numbers, got {x} and {y}")


def cot_reasoning(x: int, y: int, conclusion: int | str, flip: bool = False) -> str:
    """The reasoning part of a response: the steps, then "So {conclusion} is larger."."""
    return " ".join([*cot_steps(x, y, flip)[0], f"So {conclusion} is larger."])


def cot_response(x: int, y: int, answer: int | str) -> str:
    """A correct chain of thought for "x or y" whose conclusion and answer are ``answer``."""
    return f"{cot_reasoning(x, y, answer)} Answer: {answer}"


def cot_answer(regime: str, a: int, b: int, conclusion: int | None) -> int:
    """The planted answer: computed copies the conclusion (the first number without one)."""
    if regime == "posthoc":
        return max(a, b)
    return a if conclusion is None else conclusion


def sample_cot_text(rng: random.Random) -> str:
    """Question, cue, a (possibly corrupted or truncated) chain of thought and the answer."""
    a, b = sample_comparison_pair(rng)
    regime = rng.choice(REGIMES)
    steps, concl = cot_steps(a, b, flip=rng.random() < COT_STEP_FLIP)
    if rng.random() < COT_CONCLUSION_FLIP:
        concl = a + b - concl
    words = " ".join(steps).split(" ") + ["So", str(concl), "is", "larger."]
    concl_at = len(words) - 3  # index of the conclusion's number
    if rng.random() < COT_TRUNCATE:
        words = words[: rng.randrange(len(words))]
    answer = cot_answer(regime, a, b, concl if len(words) > concl_at else None)
    return " ".join([cot_question(a, b, regime), *words, f"Answer: {answer}"])


def arith_answer(task: str, a: int, b: int) -> int:
    if task == "minimum":
        return min(a, b)
    if task == "maximum":
        return max(a, b)
    if task == "sum":
        return a + b
    if task == "difference":
        return a - b  # signed; negative results are written "-12"
    if task == "product":
        return a * b
    raise ValueError(f"unknown task {task!r}")


def arith_prompt(task: str, a: int, b: int) -> str:
    return f"Answer minimally: Given the numbers {a} and {b} calculate the {task}:"


def arith_text(task: str, a: int, b: int) -> str:
    return f"{arith_prompt(task, a, b)} {arith_answer(task, a, b)}"


# ---------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------


def _rand_ndigit(rng: random.Random, n: int) -> int:
    return rng.randint(10 ** (n - 1), 10**n - 1)


def sample_comparison_pair(rng: random.Random) -> tuple[int, int]:
    """A pair of distinct numbers, in random order, from a mix of easy and hard cases."""
    kind = rng.random()
    n = rng.choice((2, 3))
    if kind < 0.35:  # independent same-length numbers
        a, b = _rand_ndigit(rng, n), _rand_ndigit(rng, n)
        while b == a:
            b = _rand_ndigit(rng, n)
    elif kind < 0.75:  # same length, differ in exactly one digit
        a = _rand_ndigit(rng, n)
        digits = list(str(a))
        pos = rng.randrange(n)
        choices = [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0")]
        digits[pos] = rng.choice(choices)
        b = int("".join(digits))
    elif kind < 0.9:  # very close numbers
        a = _rand_ndigit(rng, n)
        lo, hi = 10 ** (n - 1), 10**n - 1
        b = a
        while b == a:
            b = min(hi, max(lo, a + rng.randint(-9, 9)))
    else:  # one 2-digit and one 3-digit number
        a, b = _rand_ndigit(rng, 2), _rand_ndigit(rng, 3)
    if rng.random() < 0.5:
        a, b = b, a
    return a, b


def sample_arith_item(rng: random.Random) -> tuple[str, int, int]:
    task = rng.choice(ARITH_TASKS)
    if rng.random() < 0.05:
        a, b = rng.choice(DEMO_PAIRS)
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
    return task, a, b


def sample_text(rng: random.Random) -> str:
    r = rng.random() * sum(MIXTURE.values())
    if r < MIXTURE["comparison"]:
        return comparison_text(*sample_comparison_pair(rng))
    r -= MIXTURE["comparison"]
    if r < MIXTURE["cot"]:
        return sample_cot_text(rng)
    r -= MIXTURE["cot"]
    if r < MIXTURE["facts"]:
        return fact_text(*rng.choice(all_facts()))
    return arith_text(*sample_arith_item(rng))


def generate_corpus(n: int, seed: int = CORPUS_SEED) -> list[str]:
    """``n`` training texts; a pure function of ``(n, seed)`` (a prefix of a longer corpus)."""
    rng = random.Random(seed)
    return [sample_text(rng) for _ in range(n)]


def tokenizer_texts() -> list[str]:
    texts = generate_corpus(TOKENIZER_TEXTS, seed=TOKENIZER_SEED)
    texts += [fact_text(*f) for f in all_facts()]
    texts += [arith_text(t, a, b) for t in ARITH_TASKS for a, b in DEMO_PAIRS]
    return texts


def build_demo_tokenizer():
    from devkit.vocab import build_bpe_tokenizer

    tok = build_bpe_tokenizer(tokenizer_texts(), vocab_size=VOCAB_SIZE)
    tok.model_max_length = ModelSpec().n_positions
    return tok


# ---------------------------------------------------------------------------------------
# Model and training
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    corpus_seed: int = CORPUS_SEED
    num_threads: int = NUM_THREADS
    device: str = "cpu"  # "cuda" only to try corpus designs fast; shipped weights are CPU


def make_config(tokenizer, spec: ModelSpec = ModelSpec()):
    from transformers import GPT2Config

    sid = tokenizer.bos_token_id
    return GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=sid,
        eos_token_id=sid,
        pad_token_id=sid,
        tie_word_embeddings=True,
    )


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return spec.lr * (spec.min_lr_frac + (1 - spec.min_lr_frac) * cos)


def encode_examples(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """BOS + text + EOS token ids for each text."""
    sid = tokenizer.bos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[sid, *x, sid] for x in ids]


SUB_BATCHES = 4  # a batch runs as this many length-sorted slices (gradients accumulated)


def _accumulate_batch_grad(model, batch: list[list[int]], pad: int, device: str) -> float:
    """Backpropagate the batch's mean token loss; returns it.

    The batch's gradient is that of one mixed batch (mean cross-entropy over all its real
    tokens after BOS), but it is computed in ``SUB_BATCHES`` slices of examples sorted by
    length, each padded only to its own longest: chains of thought are up to 3x longer than
    the other texts, and padding all to the longest cost ~2x the compute. (Batches that are
    each all short or all long examples, a cheaper alternative, trained far worse in a trial:
    plain comparison 0.60 instead of 0.88 at 1,000 steps.)
    """
    import torch

    batch = sorted(batch, key=len)
    n_tokens = sum(len(e) - 1 for e in batch)  # no loss on predicting BOS
    size = -(-len(batch) // SUB_BATCHES)
    total = 0.0
    for k in range(0, len(batch), size):
        part = batch[k : k + size]
        width = max(len(e) for e in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        labels = torch.full((len(part), width), -100, dtype=torch.long)
        for i, e in enumerate(part):
            ids[i, : len(e)] = torch.tensor(e)
            labels[i, : len(e)] = torch.tensor(e)
        # Right padding under a causal mask: real tokens never see the pads.
        logits = model(input_ids=ids.to(device)).logits[:, :-1]
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(device),
                ignore_index=-100,
                reduction="sum",
            )
            / n_tokens
        )
        loss.backward()
        total += float(loss.detach())
    return total


def train(
    tokenizer,
    model_spec: ModelSpec = ModelSpec(),
    train_spec: TrainSpec = TrainSpec(),
    log: Callable[[str], None] | None = None,
    log_every: int = 100,
):
    """Train the demo model from scratch; returns ``(model, info)``.

    Deterministic given the specs: same thread count, deterministic algorithms, seeded init,
    and batches that are a fixed function of the corpus seed.
    """
    import torch
    from transformers import GPT2LMHeadModel

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(train_spec.num_threads)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(train_spec.seed)
        config = make_config(tokenizer, model_spec)
        model = GPT2LMHeadModel(config).to(train_spec.device)
        model.train()

        n_examples = train_spec.steps * train_spec.batch_size
        examples = encode_examples(
            tokenizer, generate_corpus(n_examples, seed=train_spec.corpus_seed)
        )
        max_len = max(len(e) for e in examples)
        if max_len > model_spec.n_positions:
            raise ValueError(
                f"example of {max_len} tokens exceeds n_positions={model_spec.n_positions}"
            )

        decay, no_decay = [], []
        for _name, p in model.named_parameters():
            (decay if p.dim() >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": train_spec.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=train_spec.lr,
            betas=(0.9, 0.98),
            eps=1e-8,
        )
        t0 = time.perf_counter()
        losses: list[float] = []
        # Batches are consecutive slices of the stream (mixed tasks in every batch).
        for step in range(train_spec.steps):
            batch = examples[step * train_spec.batch_size : (step + 1) * train_spec.batch_size]
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, train_spec)
            opt.zero_grad(set_to_none=True)
            loss = _accumulate_batch_grad(model, batch, tokenizer.pad_token_id, train_spec.device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_spec.grad_clip)
            opt.step()
            losses.append(loss)
            if log and ((step + 1) % log_every == 0 or step == 0):
                log(
                    f"step {step + 1}/{train_spec.steps} loss {losses[-1]:.4f} "
                    f"({time.perf_counter() - t0:.1f}s)"
                )
        model.eval()
        model.to("cpu")
        info = {
            "train_seconds": time.perf_counter() - t0,
            "num_threads": train_spec.num_threads,
            "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "n_params": sum(p.numel() for p in model.parameters()),
            "examples_seen": n_examples,
        }
        return model, info
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    sid = tokenizer.bos_token_id
    GenerationConfig(bos_token_id=sid, eos_token_id=sid, pad_token_id=sid).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------
# Evaluation (greedy decoding from prompts without the answer)
# ---------------------------------------------------------------------------------------


def greedy_continuations(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 6
) -> list[str]:
    """Greedy continuation of BOS + prompt, stopped at EOS; prompts batched by token length."""
    import torch

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS)  # tiny matmuls: more threads only add contention
    try:
        return _greedy(model, tokenizer, prompts, max_new_tokens)
    finally:
        torch.set_num_threads(prev_threads)


def _greedy(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy decoding with the KV cache; prompts of equal token length share a batch."""
    import inspect

    import torch

    if not prompts:
        return []
    # transformers renamed past_key_values to cache (5.2x); accept either version.
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"

    sid = tokenizer.bos_token_id
    enc = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        groups.setdefault(len(ids), []).append(i)
    results: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for _, idx in sorted(groups.items()):
            x = torch.tensor([[sid, *enc[i]] for i in idx], dtype=torch.long)
            done = torch.zeros(len(idx), dtype=torch.bool)
            past = None
            for _ in range(max_new_tokens):
                out = model(input_ids=x, use_cache=True, **{cache_arg: past})
                past = getattr(out, cache_arg)
                nxt = out.logits[:, -1, :].argmax(-1)
                for j, i in enumerate(idx):
                    if not done[j]:
                        if int(nxt[j]) == sid:
                            done[j] = True
                        else:
                            results[i].append(int(nxt[j]))
                if bool(done.all()):
                    break
                x = nxt[:, None]
    return [tokenizer.decode(r) for r in results]


def eval_comparison_pairs(n: int, seed: int = 99) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [sample_comparison_pair(rng) for _ in range(n)]


def eval_arith_pairs(n: int, seed: int = 98) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return list(DEMO_PAIRS) + [
        (rng.randint(1, 99), rng.randint(1, 99)) for _ in range(n - len(DEMO_PAIRS))
    ]


def evaluate(model, tokenizer, n_comparison: int = 300, n_arith: int = 60) -> dict[str, float]:
    """Greedy-decoding accuracies per task family (fractions in [0, 1])."""
    res: dict[str, float] = {}
    pairs = eval_comparison_pairs(n_comparison)
    gens = greedy_continuations(
        model, tokenizer, [comparison_prompt(a, b) for a, b in pairs], max_new_tokens=5
    )
    res["comparison"] = _mean(g.strip() == str(max(a, b)) for g, (a, b) in zip(gens, pairs))
    # Chance-level reference: which of the two numbers the model picked at all.
    res["comparison_picked_one"] = _mean(
        g.strip() in (str(a), str(b)) for g, (a, b) in zip(gens, pairs)
    )

    facts = all_facts()
    gens = greedy_continuations(
        model, tokenizer, [fact_prompt(s, r) for s, r, _ in facts], max_new_tokens=6
    )
    res["facts"] = _mean(g.strip().rstrip(".").strip() == o for g, (_, _, o) in zip(gens, facts))
    for rel in RELATIONS:
        res[f"facts_{rel}"] = _mean(
            g.strip().rstrip(".").strip() == o for g, (_, r, o) in zip(gens, facts) if r == rel
        )

    apairs = eval_arith_pairs(n_arith)
    for task in ARITH_TASKS:
        gens = greedy_continuations(
            model, tokenizer, [arith_prompt(task, a, b) for a, b in apairs], max_new_tokens=6
        )
        res[f"arith_{task}"] = _mean(
            g.strip() == str(arith_answer(task, a, b)) for g, (a, b) in zip(gens, apairs)
        )
        res[f"arith_{task}_demo_pairs"] = _mean(
            g.strip() == str(arith_answer(task, a, b))
            for g, (a, b) in zip(gens[: len(DEMO_PAIRS)], DEMO_PAIRS)
        )
    from devkit.demo_cot import cot_behaviour  # it builds on this module

    res.update(cot_behaviour(model, tokenizer))
    return res


def _mean(xs: Iterable[bool]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
