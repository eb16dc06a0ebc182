"""Errors that tell the user which file, line/row and field is wrong."""

from __future__ import annotations

import os


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
