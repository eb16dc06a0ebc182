"""Tokens and batches: how prompts are tokenized (the BOS policy) and grouped into batches.

* Tokenization is ours: ``add_special_tokens=False`` and, by policy, the tokenizer's BOS id
  prepended explicitly (never twice).
* Prompts are sorted by token length into batches (padded on the RIGHT by the caller); a sharded
  job runs whole batches of the one global plan, so its arrays equal the unsharded ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from layerscope.errors import LayerscopeError


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the model's own tokenizer puts BOS first: it defines a BOS token and either adds it
    when encoding (Llama, DeepSeek-R1-Distill-Qwen, Gemma, OPT) or, GPT-2 style, adds no special
    token at all while its BOS is also its EOS document separator (GPT-2, Pythia, Phi: the
    TransformerLens convention, kept). A tokenizer without a BOS token (Qwen2.5, Qwen3) -> False.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except (TypeError, KeyError, ValueError):  # a minimal tokenizer object: trust its BOS token
        return True
    if with_special and with_special[0] == bos:
        return True
    return bos == getattr(tokenizer, "eos_token_id", None) and with_special == plain


def resolve_bos(tokenizer, policy: str | bool = "auto") -> bool:
    """``bos: auto | true | false`` -> whether to prepend BOS. ``auto``: iff the model's own
    tokenizer puts one first (:func:`tokenizer_adds_bos`)."""
    if isinstance(policy, str):
        p = policy.strip().lower()
        if p == "auto":
            return tokenizer_adds_bos(tokenizer)
        if p in ("true", "yes", "1"):
            policy = True
        elif p in ("false", "no", "0"):
            policy = False
        else:
            raise LayerscopeError(
                f"bos policy {policy!r} not understood; expected auto, true or false"
            )
    if policy and getattr(tokenizer, "bos_token_id", None) is None:
        raise LayerscopeError(
            "bos: true, but the tokenizer has no BOS token; use bos: auto or false"
        )
    return bool(policy)


def tokenize_prompts(tokenizer, texts: Sequence[str], *, prepend_bos: bool) -> list[list[int]]:
    """Token ids of each text: ``add_special_tokens=False``, then BOS prepended if ``prepend_bos``.

    Never doubles BOS: if the ids already start with the BOS id (a tokenizer that inserts it
    anyway, or a text that starts with the BOS string) no second one is added. With
    ``prepend_bos=False`` a BOS the tokenizer inserted on its own is removed.
    """
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos_str = getattr(tokenizer, "bos_token", None)
    if prepend_bos and bos_id is None:
        raise LayerscopeError("prepend_bos=True but the tokenizer has no BOS token")
    texts = list(texts)
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[list[int]] = []
    for text, ids in zip(texts, encoded):
        ids = list(ids)
        starts_with_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
        if prepend_bos:
            if not starts_with_bos:
                ids = [bos_id] + ids
        elif starts_with_bos and not (bos_str and text.startswith(bos_str)):
            ids = ids[1:]  # inserted by the tokenizer despite add_special_tokens=False
        out.append(ids)
    return out


def token_arrays(
    tokenizer,
    texts: Sequence[str],
    rows: Iterable[int],
    prepend: bool,
    *,
    keep: bool,
    chunk: int = 1024,
) -> list[Any]:
    """Token ids of ``texts[rows]`` as int64 arrays, tokenized ``chunk`` texts at a time (a fast
    tokenizer's per-text encodings are large; holding all of them at once costs ~6 KB a prompt).
    With ``keep=False`` only the lengths are kept (one-element placeholders of the right ``len``).
    """
    rows = list(rows)
    out: list[Any] = []
    for start in range(0, len(rows), chunk):
        part = [texts[i] for i in rows[start : start + chunk]]
        for x in tokenize_prompts(tokenizer, part, prepend_bos=prepend):
            out.append(np.asarray(x, dtype=np.int64) if keep else range(len(x)))
    return out


def make_batches(
    lengths: Sequence[int], batch_size: int, max_tokens_per_batch: int | None = None
) -> list[list[int]]:
    """Group prompt indices into batches of similar length (longest first).

    A batch holds at most ``batch_size`` prompts and, if given, at most ``max_tokens_per_batch``
    padded tokens (a single longer prompt still gets a batch of its own). Indices inside a
    batch are ascending (prompt-table order), so results can be written with one selection.
    """
    if batch_size < 1:
        raise LayerscopeError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
        raise LayerscopeError(f"max_tokens_per_batch must be >= 1, got {max_tokens_per_batch}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        new_max = max(cur_max, lengths[i])
        too_many = len(cur) + 1 > batch_size
        too_big = (
            max_tokens_per_batch is not None and (len(cur) + 1) * new_max > max_tokens_per_batch
        )
        if cur and (too_many or too_big):
            batches.append(sorted(cur))
            cur, new_max = [], lengths[i]
        cur.append(i)
        cur_max = new_max
    if cur:
        batches.append(sorted(cur))
    return batches


def shard_batches(
    batches: Sequence[Sequence[int]], lengths: Sequence[int], index: int, count: int
) -> list[list[int]]:
    """The batches that shard ``index`` of ``count`` runs: whole batches, balanced by padded tokens.

    Sharding cuts the one global batch plan rather than the prompt table, so every prompt is
    computed in exactly the batch (same neighbours, same padding) it would get unsharded: the
    arrays are then identical for any shard count, not merely close.
    """
    if count < 1 or not 0 <= index < count:
        raise LayerscopeError(
            f"shard {index} of {count} does not exist; shards are numbered 0..{count - 1}"
        )
    cost = [len(b) * max(lengths[i] for i in b) for b in batches]
    total = sum(cost)
    out: list[list[int]] = []
    done = 0
    for batch, c in zip(batches, cost):
        # A batch belongs to the shard its midpoint falls in (integer arithmetic: no float ties).
        if min(count - 1, (2 * done + c) * count // (2 * total)) == index:
            out.append(list(batch))
        done += c
    return out


def batches_over_cap(
    lengths: Sequence[int], batches: Sequence[Sequence[int]], cap: int | None
) -> list[int]:
    """Indices of batches whose padded size (prompts x longest) exceeds ``cap`` (a batch of one
    prompt longer than the cap: :func:`make_batches` never splits a prompt)."""
    if not cap:
        return []
    return [i for i, b in enumerate(batches) if len(b) * max(int(lengths[j]) for j in b) > int(cap)]
