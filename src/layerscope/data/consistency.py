"""Checks that cached activations belong to the *current* prompt table.

A layer file stores the prompt ids, labels (and groups) of the table it was cached from. If the
table changes afterwards (a filter, a cap, a relabelled row) and the activations are not rebuilt
- results copied from elsewhere, ``--touch``, edited timestamps - a probe would silently train on
old labels or misaligned rows. Every reader of layer files therefore compares them with
``results/datasets/{dataset}/prompts.csv`` first and stops with a message naming both files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from layerscope.errors import LayerscopeError

PathLike = str | os.PathLike

#: How many differing prompts a mismatch message lists.
MAX_SHOWN = 5


class TableMismatchError(LayerscopeError):
    """An activation file was built from a different prompt table than the current one."""


class PromptTable:
    """The columns of a prompt table the activations must agree with (read once, reused)."""

    def __init__(
        self,
        path: PathLike,
        prompt_ids: Sequence[str],
        labels: Sequence[str],
        groups: Sequence[str] | None,
        texts: Sequence[str] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.prompt_ids = [str(x) for x in prompt_ids]
        self.labels = [str(x) for x in labels]
        self.groups = None if groups is None else [str(x) for x in groups]
        self.texts = None if texts is None else [str(x) for x in texts]


def read_table(table_path: PathLike) -> PromptTable:
    """Prompt ids, labels and groups of a prompt table (via ``datasets.read_prompt_table``)."""
    if isinstance(table_path, PromptTable):
        return table_path
    from layerscope.data.datasets import read_prompt_table

    df = read_prompt_table(table_path)
    groups = df["group"].tolist() if "group" in df.columns else None
    return PromptTable(
        table_path, df["prompt_id"].tolist(), df["label"].tolist(), groups, df["text"].tolist()
    )


def _q(value: str) -> str:
    return repr(str(value))


def _id_differences(ids: Sequence[str], table_ids: Sequence[str], n: int = MAX_SHOWN) -> list[str]:
    """Readable first differences between two prompt-id lists (dropped, added, then order)."""
    out: list[str] = []
    in_table = set(table_ids)
    in_file = set(ids)
    gone = [p for p in ids if p not in in_table]
    new = [p for p in table_ids if p not in in_file]
    out += [f"{_q(p)} is not in the table" for p in gone[:n]]
    out += [f"{_q(p)} is not in the activations" for p in new[: max(0, n - len(out))]]
    if len(out) < n:
        # Same members (or what is left after the above): show where the order first parts.
        kept = [p for p in ids if p in in_table]
        kept_table = [p for p in table_ids if p in in_file]
        for a, b in zip(kept, kept_table):
            if a != b:
                where = ids.index(a) + 1
                out.append(f"row {where}: {_q(a)} in the activations, {_q(b)} in the table")
                if len(out) >= n:
                    break
    return out


def check_against_table(
    prompt_ids: Sequence[Any],
    labels: Sequence[Any],
    groups: Sequence[Any] | None,
    source_path: PathLike,
    table_path: PathLike | PromptTable,
) -> None:
    """Raise :class:`TableMismatchError` unless ``prompt_ids``, ``labels`` (and ``groups``, when
    the activations carry them) equal those of the prompt table at ``table_path``, in order.

    ``source_path`` only names the activation file in the message. ``table_path`` may be a
    :class:`PromptTable` already read (by :func:`read_table`), so several files share one read.
    """
    tbl = read_table(table_path)
    src = os.fspath(source_path)
    tpath = tbl.path
    ids = [str(x) for x in prompt_ids]
    hint = (
        f"; rebuild the activations from the current table (delete {Path(src).parent}/ and rerun, "
        "or run snakemake with --forcerun cache_activations)"
    )
    if ids != tbl.prompt_ids:
        diffs = _id_differences(ids, tbl.prompt_ids)
        if len(ids) != len(tbl.prompt_ids):
            what = ""
        elif set(ids) == set(tbl.prompt_ids):
            what = " (the same prompts in a different order)"
        else:
            what = " (different prompt ids)"
        raise TableMismatchError(
            f"{src} was built for an older prompt table: {len(ids)} prompts vs "
            f"{len(tbl.prompt_ids)} in {tpath}{what}; first differences: {'; '.join(diffs)}{hint}"
        )
    columns = [("label", labels, tbl.labels)]
    if groups is not None and tbl.groups is not None:
        columns.append(("group", groups, tbl.groups))
    for name, mine, theirs in columns:
        mine = [str(x) for x in mine]
        if len(mine) != len(ids):
            raise TableMismatchError(f"{src}: {len(mine)} {name}s for {len(ids)} prompt ids")
        bad = [i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b]
        if bad:
            shown = [
                f"{_q(ids[i])} (row {i + 1}): {name} {_q(mine[i])} in the activations, "
                f"{_q(theirs[i])} in the table"
                for i in bad[:MAX_SHOWN]
            ]
            raise TableMismatchError(
                f"{src} was built for an older prompt table: {len(ids)} prompts vs {len(ids)} in "
                f"{tpath} (the same prompt ids, but {len(bad)} {name}(s) differ); "
                f"first differences: {'; '.join(shown)}{hint}"
            )


def check_files_against_table(paths: Iterable[PathLike], table_path: PathLike | PromptTable) -> int:
    """Check every activation file in ``paths`` (layer files or stores) against one prompt table.

    Reads only the prompt ids, labels and groups of each file. Returns the number of prompts.
    """
    from layerscope.data.h5cache import read_prompt_keys

    tbl = read_table(table_path)
    for path in paths:
        ids, labels, groups = read_prompt_keys(path)
        check_against_table(ids, labels, groups, path, tbl)
    return len(tbl.prompt_ids)


def check_store_texts(store_path: PathLike, table_path: PathLike | PromptTable) -> PromptTable:
    """Raise :class:`TableMismatchError` unless the store holds the table's prompts (ids in order)
    and texts (by hash); labels may differ, since a cache is keyed by its prompts, not its labels.
    Returns the table read, whose labels and groups the per-layer files then carry."""
    from layerscope.data.h5cache import read_text_hashes, text_hashes

    tbl = read_table(table_path)
    ids, _, _ = _store_keys(store_path)
    check_against_table(ids, tbl.labels, None, store_path, tbl)  # ids only: labels are the table's
    stored = read_text_hashes(store_path)
    if stored is not None and tbl.texts is not None:
        expected = text_hashes(tbl.texts)
        bad = [i for i, (a, b) in enumerate(zip(stored, expected)) if a != b]
        if bad:
            shown = ", ".join(f"{_q(ids[i])} (row {i + 1})" for i in bad[:MAX_SHOWN])
            raise TableMismatchError(
                f"{os.fspath(store_path)} was built from other prompt texts than {tbl.path}: "
                f"{len(bad)} text(s) differ, first {shown}; rebuild the activations (delete "
                f"{Path(store_path).parent}/ and rerun)"
            )
    return tbl


def _store_keys(path: PathLike):
    from layerscope.data.h5cache import read_prompt_keys

    return read_prompt_keys(path)
