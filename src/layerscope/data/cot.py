"""Chain-of-thought prompts: where the reasoning starts and where the answer starts.

A chain-of-thought prompt is a question followed by a response that ends in an answer after a
marker (a regex, default ``Answer:``), e.g. ``"Which is larger: 12 or 71?\\nSo 71. Answer: 71"``.
The prompt table (:mod:`layerscope.data.datasets`) records the two places in characters:

``reasoning_start_char``  the first non-space character of the response in the text
``marker_start_char``     the start of the last marker match (the reasoning ends there)
``answer_start_char``     the first non-space character after the *last* marker match
``answer``                the text from there on (stripped)

Token offsets depend on the model's tokenizer, so they are computed per model
(:func:`token_offsets`): the token *containing* a character. A tokenizer that merges the marker
with the answer (``": 7"`` as one token) or the question's line break with the first reasoning
word puts that character inside a token that starts earlier; the offset is then that merged token
(it is the first token that carries any of the answer), and ``answer_merged`` says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from layerscope.errors import ConfigError, InputError

DEFAULT_MARKER = "Answer:"
OFFSET_COLUMNS = ("reasoning_start_char", "marker_start_char", "answer_start_char", "answer")


def compile_marker(marker: str, key: str) -> re.Pattern:
    """The answer marker as a regex; a pattern that does not compile or matches the empty string
    is a ConfigError naming ``key``."""
    try:
        pattern = re.compile(marker)
    except re.error as exc:
        raise ConfigError(key, f"answer marker {marker!r} is not a valid regex: {exc}") from None
    if pattern.search("") is not None:
        raise ConfigError(key, f"answer marker {marker!r} matches the empty string")
    return pattern


def response_offsets(
    prefix_len: int, response: str, marker: re.Pattern, *, file: str, line: int, field: str
) -> dict[str, object]:
    """Offsets (in the full text ``prefix + response``, ``prefix`` having ``prefix_len``
    characters) of the reasoning and the answer of one response. A response without the marker,
    or with nothing after its last match, is an InputError naming file, line and field."""
    matches = list(marker.finditer(response))
    if not matches:
        raise InputError(
            f"response has no answer marker {marker.pattern!r}: {response[-60:]!r}",
            file=file,
            line=line,
            field=field,
        )
    end = matches[-1].end()
    rest = response[end:]
    answer = rest.strip()
    if not answer:
        raise InputError(
            f"nothing follows the answer marker {marker.pattern!r} in the response",
            file=file,
            line=line,
            field=field,
        )
    lead = len(response) - len(response.lstrip())
    return {
        "reasoning_start_char": prefix_len + lead,
        "marker_start_char": prefix_len + matches[-1].start(),
        "answer_start_char": prefix_len + end + (len(rest) - len(rest.lstrip())),
        "answer": answer,
    }


@dataclass(frozen=True)
class TokenOffsets:
    """Token positions of one prompt (BOS included when prepended; see module docstring)."""

    n_tokens: int
    reasoning_start: int
    marker_start: int
    answer_start: int
    answer_token: int  # the id of the answer's first token
    answer_merged: bool  # the answer's first token also holds text before the answer


def char_spans(tokenizer, text: str, ids: Sequence[int], bos: bool) -> list[tuple[int, int]]:
    """(start, end) character span of every token of ``ids`` (the prompt's ids as
    :func:`layerscope.engine.tokens.tokenize_prompts` made them); BOS gets (0, 0).

    Needs a fast tokenizer (offset mapping); its ids must be exactly ``ids``."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise ConfigError(
            "cot", f"token offsets need a fast tokenizer (offset mapping): {exc}"
        ) from None
    own = list(ids[1:] if bos else ids)
    got, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
    if got and bos and got[0] == ids[0] and got[1:] == own:  # a tokenizer that inserts BOS
        got, spans = got[1:], spans[1:]
    if got != own:
        raise InputError(
            "the tokenizer's offset mapping gives other ids than the prompt's tokenization "
            f"({len(got)} vs {len(own)} tokens) for {text[:60]!r}"
        )
    return ([(0, 0)] if bos else []) + spans


def token_containing(spans: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the first token whose span ends after ``char`` (the token holding it; with
    trimmed offsets a space belongs to no token, so the next one is taken)."""
    for i, (start, end) in enumerate(spans):
        if end > char and end > start:
            return i
    raise InputError(f"character {char} lies beyond the last token")


def token_offsets(
    tokenizer, text: str, ids: Sequence[int], bos: bool, chars: Sequence[int]
) -> TokenOffsets:
    """Token offsets of one chain-of-thought prompt from its character offsets ``chars`` =
    (reasoning start, marker start, answer start). The marker's token is the first one that
    holds any of it, but never before the reasoning's first token."""
    spans = char_spans(tokenizer, text, ids, bos)
    r, m, a = (token_containing(spans, c) for c in chars)
    m = max(m, r)
    if a < 1 or r > a:
        raise InputError(
            f"the answer starts at token {a}, before the reasoning (token {r}): {text[:60]!r}"
        )
    merged = text[spans[a][0] : chars[2]].strip() != ""
    return TokenOffsets(len(ids), r, m, a, int(ids[a]), bool(merged))
