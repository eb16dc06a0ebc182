"""Errors that tell the user which file, line/row and field is wrong."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence


class LayerscopeError(Exception):
    """Base class for errors that are the user's to fix (bad input or config), not bugs."""


class InputError(LayerscopeError):
    """Bad input data. The message always starts with the file and, when known, line/row and field.

    ``line`` is a 1-based physical line number in a text file (JSONL, or a CSV line).
    ``row`` is a 1-based data row number in a table (header excluded), used when line
    numbers are not meaningful (e.g. quoted multi-line CSV cells).
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | os.PathLike | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = os.fspath(file) if file is not None else None
        self.line = line
        self.row = row
        self.field = field
        self.reason = message
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.row is not None:
            where.append(f"row {self.row}")
        prefix = ", ".join(where)
        field = f"field '{self.field}': " if self.field is not None else ""
        return f"{prefix}: {field}{self.reason}" if prefix else f"{field}{self.reason}"


class ConfigError(LayerscopeError):
    """A mistake in the workflow config, named by its key path (e.g. ``models.demo.layers[2]``)."""

    def __init__(self, key_path: str, reason: str) -> None:
        self.key_path = key_path
        self.reason = reason
        super().__init__(f"config key '{key_path}': {reason}")


# --------------------------------------------------------------------------------------------------
# failures of the machine or of input files that surface as library exceptions (not layerscope bugs)

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """An OSError for a full disk or quota, including h5py's (which has errno only in its text)."""
    if not isinstance(exc, OSError):
        return False
    return (
        exc.errno in _DISK_FULL or "No space left on device" in str(exc) or "errno = 28" in str(exc)
    )


def environment_error(
    exc: BaseException, *, inputs: Sequence[str] = (), outputs: Sequence[str] = ()
) -> LayerscopeError | None:
    """The user's-to-fix error behind ``exc``, with the file and what to do, or None.

    A full disk while writing ``outputs``, and a weights file that safetensors cannot read
    (truncated download, corrupt copy) among ``inputs``, are not bugs in layerscope."""
    if is_disk_full(exc):
        # The job's outputs, not exc.filename: that is the temporary file the output is written
        # through.
        target = (
            ", ".join(map(str, outputs)) or getattr(exc, "filename", None) or "the job's output"
        )
        return LayerscopeError(
            f"no space left on the device while writing {target}: free some space on that disk (or "
            "write results/ to a larger one) and run the same command again; the partial file was "
            "not kept"
        )
    if type(exc).__name__ == "SafetensorError":
        weights = [str(f) for f in inputs if str(f).endswith(".safetensors")] or [
            str(f) for f in inputs
        ]
        return LayerscopeError(
            f"{', '.join(weights) or 'a model weights file'}: the weights cannot be read ({exc}); "
            "the file is truncated or corrupt: download the model again (or save it again with "
            "save_pretrained) and rerun"
        )
    return None


def name_list(ids: Sequence[str], limit: int = 10) -> str:
    """The first ``limit`` ids, comma-separated, and how many more there are."""
    ids = [str(i) for i in ids]
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more
