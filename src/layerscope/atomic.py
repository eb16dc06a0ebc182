"""Write-then-rename helpers, so a crash never leaves a file that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: mkstemp's random part: 8 characters from lowercase letters, digits and "_".
_TEMP_PART = r"[a-z0-9_]{8}"
_IMPORT_TIME = time.time()
_process_start: float | None = None


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; rename it onto ``target`` only on success.

    The temporary file (``.{name}.XXXXXXXX.tmp``) lives in the same directory so the final
    ``os.replace`` is atomic on POSIX filesystems. On any exception the temporary file is
    removed and ``target`` is left untouched (absent if it did not exist). A writer killed
    outright (SIGKILL, OOM killer, power loss) cannot clean up; its temporary file is never
    taken for ``target``, and the next write of the same target removes it
    (:func:`remove_stale_temps`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def temp_pattern(target: str | os.PathLike) -> re.Pattern:
    """The names :func:`atomic_path` gives the temporary files of ``target`` (and no others)."""
    return re.compile(rf"\.{re.escape(Path(target).name)}\.{_TEMP_PART}\.tmp")


def remove_stale_temps(target: str | os.PathLike, older_than: float | None = None) -> list[Path]:
    """Delete temporary files of ``target`` left behind by killed writers; return those removed.

    Only files last modified before ``older_than`` (seconds since the epoch; default: when this
    process started) are removed, so a temporary file that is still being written by a writer
    that started after this process is left alone. Best effort: errors are ignored.

    Caveat: a *concurrent* writer of the same target that started before this process and has
    not touched its temporary file since would lose it; its final rename then fails loudly
    (FileNotFoundError) instead of publishing anything. Snakemake never runs two jobs with the
    same output at once, so in the workflow this cannot happen.
    """
    target = Path(target)
    cutoff = _start_time() if older_than is None else older_than
    pattern = temp_pattern(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if (
                entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


def _start_time() -> float:
    """When this process started (psutil; falls back to when this module was imported)."""
    global _process_start
    if _process_start is None:
        try:
            import psutil

            _process_start = min(float(psutil.Process().create_time()), _IMPORT_TIME)
        except Exception:  # pragma: no cover - psutil missing or /proc unreadable
            _process_start = _IMPORT_TIME
    return _process_start


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: str | os.PathLike, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_csv(target: str | os.PathLike, table) -> None:
    """A pandas table as CSV with 6 significant digits, the format of every summary table."""
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def _json_default(obj):
    # numpy scalars and paths show up in summaries; keep the JSON plain.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
