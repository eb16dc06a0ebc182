"""Free-space checks before writing large activation files.

A store for a 1.5B model and a few thousand prompts runs to gigabytes; running out of disk half
way through a forward pass wastes the GPU time and leaves a temporary file behind. Callers
estimate the size with :func:`estimate_store_bytes` and call :func:`check_free_space` first.
"""

from __future__ import annotations

import operator
import os
import shutil
from pathlib import Path

from layerscope.errors import LayerscopeError

#: Extra room asked for on top of the estimate: a share of it, plus 1 MiB of slack (HDF5 rounds
#: allocations up). Proportional, so a small store on a small disk is not refused for want of a
#: fixed margin far larger than the store itself (a fixed 64 MiB refused a 1.3 MB store).
MARGIN_FRACTION = 0.05
MARGIN_BYTES = 1 << 20
#: HDF5 metadata and per-prompt bookkeeping, roughly: a fixed part plus bytes per prompt
#: (prompt_id, label and group strings, n_tokens, n_pooled).
OVERHEAD_BYTES = 1 << 20
PER_PROMPT_BYTES = 256


def _count(name: str, value) -> int:
    """``value`` as a non-negative int; ValueError naming ``name`` otherwise."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def estimate_store_bytes(
    n_layers: int,
    n_prompts: int,
    d_model: int,
    n_components: int,
    n_poolings: int,
    n_token_rows: int = 0,
    n_token_layers: int = 0,
    itemsize: int = 4,
) -> int:
    """Upper estimate of the size in bytes of an uncompressed activation store.

    * pooled arrays: ``n_components * n_poolings`` arrays of ``[n_layers, n_prompts, d_model]``;
    * token level: per component ``[n_token_layers, n_token_rows, d_model]`` values and
      ``n_prompts + 1`` int64 offsets, plus ``n_token_rows`` int64 token ids (only when
      ``n_token_layers > 0``; ``n_token_rows`` is the number of pooled tokens over all prompts);
    * metadata: :data:`OVERHEAD_BYTES` + :data:`PER_PROMPT_BYTES` per prompt.

    ``itemsize`` is the bytes per stored float (4 for float32, 2 for float16/bfloat16).
    Compression is ignored, so a compressed store is smaller. A per-layer file is the same
    with ``n_layers = 1`` (and ``n_token_layers`` 0 or 1).
    """
    n_layers = _count("n_layers", n_layers)
    n_prompts = _count("n_prompts", n_prompts)
    d_model = _count("d_model", d_model)
    n_components = _count("n_components", n_components)
    n_poolings = _count("n_poolings", n_poolings)
    n_token_rows = _count("n_token_rows", n_token_rows)
    n_token_layers = _count("n_token_layers", n_token_layers)
    itemsize = _count("itemsize", itemsize)
    pooled = n_components * n_poolings * n_layers * n_prompts * d_model * itemsize
    tokens = 0
    if n_token_layers:
        tokens = n_components * (
            n_token_layers * n_token_rows * d_model * itemsize + (n_prompts + 1) * 8
        )
        tokens += n_token_rows * 8
    return int(pooled + tokens + OVERHEAD_BYTES + PER_PROMPT_BYTES * n_prompts)


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; ``3 * 2**30`` -> ``'3.0 GiB'``."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def existing_ancestor(directory: str | os.PathLike) -> Path:
    """``directory`` itself if it exists, else its nearest existing parent (absolute)."""
    path = Path(os.path.abspath(os.fspath(directory)))
    while not path.exists():
        if path.parent == path:
            break
        path = path.parent
    return path


def required_bytes(needed_bytes: int) -> int:
    """The estimate plus the safety margin (:data:`MARGIN_FRACTION` and :data:`MARGIN_BYTES`)."""
    return int(needed_bytes * (1 + MARGIN_FRACTION)) + MARGIN_BYTES


def check_free_space(directory: str | os.PathLike, needed_bytes: int, what: str) -> int:
    """Raise :class:`LayerscopeError` unless the filesystem holding ``directory`` has room for
    ``needed_bytes`` plus the safety margin; return the free bytes.

    ``directory`` need not exist yet: the nearest existing ancestor is asked (where it will be
    created). ``what`` names the file(s) in the message, e.g.
    ``"the activation store of demo/tasks"``.
    """
    needed = int(needed_bytes)
    if needed < 0:
        raise ValueError(f"needed_bytes must be >= 0, got {needed_bytes}")
    where = existing_ancestor(directory)
    free = int(shutil.disk_usage(where).free)
    required = required_bytes(needed)
    if free < required:
        on = f" on {where}" if where != Path(os.path.abspath(os.fspath(directory))) else ""
        raise LayerscopeError(
            f"not enough free space in {os.fspath(directory)} for {what}: "
            f"needs ~{human_bytes(required)} "
            f"(estimated), {human_bytes(free)} free{on} "
            f"(the estimate includes a {MARGIN_FRACTION:.0%} + "
            f"{human_bytes(MARGIN_BYTES)} safety margin); "
            "free some space or write the results to a larger disk"
        )
    return free
