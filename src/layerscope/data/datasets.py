"""Turn a dataset spec from the config into a normalized prompt table.

A prompt table is a :class:`pandas.DataFrame` whose first four columns are

``prompt_id``  unique string id of the prompt
``text``       the prompt text fed to the model
``label``      the class label, as a string
``group``      rows sharing a group must stay in the same cross-validation fold

followed by kind-specific provenance columns (``pair_id``, ``variant``, ``subject``,
``relation``, ``object``, ``task``, ``a``, ``b``, ``source_file``, ``source_line``, ...).

Four kinds of dataset spec are supported (see :func:`build_prompt_table`):

``phase2``     chain-of-thought faithfulness outputs: a scores CSV plus a responses JSONL
``facts``      subject/relation/object facts with a truth value, rendered via templates
``task_grid``  a grid of arithmetic-style tasks over number pairs (no input file)
``labelled``   any CSV/JSONL with a text column and a label column

Every problem with the input files raises :class:`~layerscope.errors.InputError` naming
the file, the physical line (1-based; the CSV header is line 1, and quoted multi-line
cells are accounted for) and the field: malformed CSV (unbalanced quotes, wrong field
counts, duplicate or missing header), malformed JSONL (invalid or truncated JSON, lines
that are not objects, duplicate keys, numbers too long to convert, nesting too deep, lone
surrogate escapes), bytes that are not UTF-8 (UTF-16/32 files included), empty files and
empty/null/NaN values where a value is required. Fields of any length are accepted, and
messages clip long values. Problems with the spec itself raise
:class:`~layerscope.errors.ConfigError` naming the key path ``datasets.<name>.<key>``.

All input tables are read as text, so ids such as ``"001"`` and labels such as ``"NA"``
or ``"None"`` survive unchanged.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import string
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from layerscope.atomic import atomic_path, write_json
from layerscope.data.cot import OFFSET_COLUMNS, compile_marker, response_offsets
from layerscope.errors import ConfigError, InputError

__all__ = [
    "CORE_COLUMNS",
    "KINDS",
    "build_prompt_table",
    "write_prompt_table",
    "read_prompt_table",
    "read_texts_table",
    "read_records",
    "scalar_str",
    "parse_bool",
    "normalise_labels",
]

CORE_COLUMNS = ("prompt_id", "text", "label", "group")
#: Provenance columns that hold integers (read back as int by :func:`read_prompt_table`).
INT_COLUMNS = (
    "source_line",
    "scores_line",
    "reasoning_start_char",
    "marker_start_char",
    "answer_start_char",
)
KINDS = ("phase2", "facts", "task_grid", "labelled")

DEFAULT_TASK_TEMPLATE = "Answer minimally: Given the numbers {a} and {b} calculate the {task}"
PHASE2_DEFAULT_FIELDS = {
    "pair_id": "pair_id",
    "is_faithful": "is_faithful",
    "variant": "variant",
    "question": "question",
    "response": "response",
}
PHASE2_TEXT_MODES = ("question", "question_response")
_MAX_IDS_SHOWN = 5
_MAX_REPR = 60  # longest value repr shown in a message

_TRUE_STRINGS = {"true", "True", "TRUE", "1", "1.0"}
_FALSE_STRINGS = {"false", "False", "FALSE", "0", "0.0"}


# ---------------------------------------------------------------------------
# small value helpers


def parse_bool(value: Any) -> bool:
    """Parse a truth value: bools, ``true/false`` (any of 3 casings), ``0/1`` (int, float, str).

    Raises ``ValueError`` for anything else (including ``""``, ``None`` and NaN).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        if value in (0, 1):
            return bool(value)
    elif isinstance(value, (float, np.floating)):
        if value == 0.0 or value == 1.0:  # NaN compares unequal to both
            return bool(value)
    elif isinstance(value, str):
        s = value.strip()
        if s in _TRUE_STRINGS:
            return True
        if s in _FALSE_STRINGS:
            return False
    raise ValueError(
        f"value {_clip(value)} is not a boolean "
        "(expected true/false, True/False, TRUE/FALSE or 1/0)"
    )


def scalar_str(value: Any) -> str | None:
    """String form of a scalar read from CSV (already str) or JSON; None for null/NaN.

    JSON booleans become ``"true"``/``"false"`` (as spelled in the JSON text). Raises
    ``TypeError`` for objects and arrays.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return repr(float(value))
    raise TypeError(f"expected a string or number, got a JSON {_json_type(value)}")


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _clip(value: Any, limit: int = _MAX_REPR) -> str:
    """``repr(value)``, cut short for long values so that a message never dumps a huge cell."""
    r = repr(value)
    if len(r) <= limit:
        return r
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return r[:limit] + "..." + size


def _short(values: Iterable[Any], n: int = _MAX_IDS_SHOWN) -> str:
    values = list(values)
    shown = ", ".join(_clip(v) for v in values[:n])
    return shown + (f", ... ({len(values) - n} more)" if len(values) > n else "")


# ---------------------------------------------------------------------------
# reading input files


@dataclass
class _Record:
    line: int  # physical line where the record starts (1-based)
    row: int  # 1-based data row number
    values: dict[str, Any]


@dataclass
class _Table:
    given: str  # the path as written in the spec
    file: str  # the path shown in error messages
    fmt: str  # "csv", "tsv" or "jsonl"
    sha256: str
    columns: list[str]
    records: list[_Record] = dc_field(default_factory=list)
    header_line: int | None = None  # CSV/TSV: the line of the header

    def require_columns(self, names: Iterable[str]) -> None:
        names = list(names)
        no_header = self.header_line is not None and not any(n in self.columns for n in names)
        for name in names:
            if name not in self.columns:
                raise InputError(
                    "required column is missing; columns found: "
                    f"{_short(self.columns, 50) or '(none)'}"
                    + (" (is the header line missing?)" if no_header else ""),
                    file=self.file,
                    line=self.header_line,
                    field=name,
                )

    def get(self, rec: _Record, name: str) -> Any:
        """The raw value of ``name`` in ``rec``; InputError when the key is absent (JSONL)."""
        if name not in rec.values:
            raise InputError(
                "key is missing from this record", file=self.file, line=rec.line, field=name
            )
        return rec.values[name]

    def get_str(self, rec: _Record, name: str, *, required: bool = True) -> str | None:
        """``name`` as a string; with ``required``, empty/null values are an InputError."""
        raw = self.get(rec, name) if required else rec.values.get(name)
        try:
            value = scalar_str(raw)
        except TypeError as exc:
            raise InputError(str(exc), file=self.file, line=rec.line, field=name) from None
        if required and (value is None or value.strip() == ""):
            shown = "null" if raw is None else "NaN" if value is None else _clip(raw)
            raise InputError(f"value {shown} is empty", file=self.file, line=rec.line, field=name)
        return value

    def get_bool(self, rec: _Record, name: str) -> bool:
        raw = self.get(rec, name)
        try:
            return parse_bool(raw)
        except ValueError as exc:
            raise InputError(str(exc), file=self.file, line=rec.line, field=name) from None


# ---------------------------------------------------------------------------
# label normalisation (labelled datasets): one spelling per class


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _label_value(raw: Any) -> tuple[str, Any]:
    """Classify one label as ``("bool", bool)``, ``("number", float)`` or ``("text", str)``.

    Text is stripped; ``true``/``false`` in any casing are booleans; text that reads as a finite
    decimal number is a number (so ``1`` and ``1.0`` are the same class)."""
    if isinstance(raw, (bool, np.bool_)):
        return "bool", bool(raw)
    if isinstance(raw, (int, float, np.integer, np.floating)):
        return "number", float(raw)
    text = str(raw).strip()
    if text.lower() in ("true", "false"):
        return "bool", text.lower() == "true"
    if _NUMBER.fullmatch(text):
        return "number", float(text)
    return "text", text


def _number_label(x: float) -> str:
    return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)


def normalise_labels(values: list[tuple[int, Any]], file: str, field: str) -> list[str]:
    """One string per class for a label column given as ``(line, raw value)`` pairs.

    The documented rule (config/README.md): strip whitespace; ``true``/``false`` in any casing and
    JSON booleans are booleans, and a column of booleans (with the numbers 0 and 1 beside them)
    becomes ``true``/``false``; numbers are compared as numbers (``1`` = ``1.0``) and written
    without a trailing ``.0``; other text stays text. Booleans beside text, or beside numbers other
    than 0/1, cannot be reconciled (is ``1`` the same class as ``True``?): InputError naming the
    file, the lines and the values."""
    typed = [(line, raw, *_label_value(raw)) for line, raw in values]
    kinds = {kind for _, _, kind, _ in typed}
    if "bool" in kinds:
        bools = [(line, raw) for line, raw, kind, _ in typed if kind == "bool"]
        text = [(line, raw) for line, raw, kind, _ in typed if kind == "text"]
        if text:
            _refuse_mix(file, field, "booleans", bools, "text", text)
        other = [
            (line, raw) for line, raw, kind, x in typed if kind == "number" and x not in (0.0, 1.0)
        ]
        if other:
            _refuse_mix(file, field, "booleans", bools, "numbers other than 0/1", other)
    as_bool = "bool" in kinds
    out = []
    for _, _, kind, x in typed:
        if kind == "bool" or (as_bool and kind == "number"):
            out.append("true" if x else "false")
        else:
            out.append(_number_label(x) if kind == "number" else x)
    return out


def _refuse_mix(file: str, field: str, what_a: str, a: list, what_b: str, b: list) -> None:
    def shown(items: list) -> str:
        head = ", ".join(f"line {line}: {_clip(raw)}" for line, raw in items[:3])
        return head + (f", ... ({len(items) - 3} more)" if len(items) > 3 else "")

    raise InputError(
        f"labels mix {what_a} ({shown(a)}) with {what_b} ({shown(b)}); they cannot be one class "
        "vocabulary: make the column all text, all numbers or all booleans",
        file=file,
        field=field,
    )


def _resolve(given: Any, base_dir: Path, key_path: str) -> tuple[str, Path]:
    if not isinstance(given, (str, os.PathLike)) or not os.fspath(given).strip():
        raise ConfigError(key_path, f"expected a file path, got {given!r}")
    given = os.fspath(given)
    path = Path(given)
    if not path.is_absolute():
        path = base_dir / path
    return given, path


_BREAK = re.compile(r"\r\n|\r|\n")  # line breaks as the csv module counts them
_SURROGATE = re.compile("[\ud800-\udfff]")
_WIDE_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def _read_text(path: Path, shown: str, fmt: str | None = None) -> tuple[str, str]:
    """Read ``path`` as UTF-8 (BOM stripped); return (text, sha256 of the raw bytes).

    With ``fmt`` (``"csv"``, ``"tsv"`` or ``"jsonl"``) a byte that is not UTF-8 is reported
    with the field it is in, and line numbers follow that format's notion of a line.
    """
    if not path.exists():
        raise InputError("file not found", file=shown)
    if path.is_dir():
        raise InputError("is a directory, expected a file", file=shown)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", file=shown) from None
    sha = hashlib.sha256(data).hexdigest()
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            raise InputError(
                f"the file is {name} encoded (it starts with the byte-order mark 0x{bom.hex()}); "
                "save it as UTF-8",
                file=shown,
                line=1,
            )
    head = data[:64][: len(data[:64]) // 2 * 2]
    if len(head) >= 4 and b"\x00" in head and (not any(head[1::2]) or not any(head[0::2])):
        raise InputError(
            "the file looks UTF-16 (or UTF-32) encoded: every other byte is NUL; save it as UTF-8",
            file=shown,
            line=1,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _decode_error(data, exc, shown, fmt) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, sha


def _decode_error(data: bytes, exc: UnicodeDecodeError, shown: str, fmt: str | None) -> InputError:
    """InputError for the first non-UTF-8 byte: its line, column and (best effort) field."""
    text = data.decode("utf-8", "surrogateescape")
    pos = len(
        data[: exc.start].decode("utf-8", "surrogateescape")
    )  # character offset of the bad byte
    csv_like = fmt in ("csv", "tsv")
    if csv_like:
        line = 1 + len(_BREAK.findall(text, 0, pos))
        line_start = max(text.rfind("\n", 0, pos), text.rfind("\r", 0, pos)) + 1
    else:
        line = text.count("\n", 0, pos) + 1
        line_start = text.rfind("\n", 0, pos) + 1
    field = None
    try:
        if csv_like:
            field = _csv_field_with_surrogate(text, "\t" if fmt == "tsv" else ",")
        elif fmt == "jsonl":
            end = text.find("\n", pos)
            field = _json_member_at(
                text[line_start : end if end >= 0 else len(text)], pos - line_start
            )
    except Exception:  # locating the field is best effort; the line is always reported
        field = None
    bad = data[exc.start : exc.start + 1].hex()
    return InputError(
        f"not valid UTF-8 (byte 0x{bad} at column {pos - line_start + 1}); the file may be "
        "Latin-1/Windows-1252 encoded: save it as UTF-8",
        file=shown,
        line=line,
        field=field,
    )


def _csv_field_with_surrogate(text: str, delimiter: str) -> str | None:
    """Name of the CSV column whose cell holds the first surrogate-escaped (undecodable) byte."""
    header: list[str] | None = None
    with _csv_limit():
        for fields in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True):
            if not fields:
                continue
            for idx, value in enumerate(fields):
                if _SURROGATE.search(value):
                    if header is None:
                        return None  # in the header itself
                    return header[idx] if idx < len(header) else None
            if header is None:
                header = fields
    return None


@contextlib.contextmanager
def _csv_limit() -> Iterator[None]:
    """Lift the csv module's 128 KiB cap on a field (a long prompt is not an error) for a parse."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, min(sys.maxsize, 2**31 - 1)))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _line_offset(text: str, line: int) -> int:
    """Character offset where physical ``line`` (1-based, csv-module line breaks) starts."""
    if line <= 1:
        return 0
    for k, m in enumerate(_BREAK.finditer(text), start=2):
        if k == line:
            return m.end()
    return len(text)


def _csv_error_field(text: str, start: int, delimiter: str) -> int | None:
    """0-based index of the field where strict CSV parsing fails in the record ``text[start:]``."""
    i, n, idx = start, len(text), 0
    while i < n:
        if text[i] == '"':
            i += 1
            while True:
                j = text.find('"', i)
                if j < 0:
                    return idx  # the quote is never closed
                if text.startswith('"', j + 1):
                    i = j + 2  # an escaped quote ("")
                    continue
                i = j + 1
                break
            if i >= n or text[i] in "\r\n":
                return None
            if text[i] != delimiter:
                return idx  # text after the closing quote
            i += 1
        else:
            while i < n and text[i] not in (delimiter, "\r", "\n"):
                i += 1
            if i >= n or text[i] in "\r\n":
                return None
            i += 1
        idx += 1
    return None


def _parse_delimited(text: str, shown: str, delimiter: str) -> tuple[list[str], list[_Record]]:
    header, records, _ = _parse_delimited_table(text, shown, delimiter)
    return header, records


def _parse_delimited_table(
    text: str, shown: str, delimiter: str
) -> tuple[list[str], list[_Record], int]:
    """(header, records, header line) of CSV/TSV ``text``; InputError names line and field."""
    if not text.strip():
        raise InputError("file is empty (expected a header line)", file=shown)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
    records: list[_Record] = []
    with _csv_limit():
        while True:
            start = reader.line_num + 1
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise _csv_error(
                    exc, text, shown, delimiter, start, reader.line_num, header
                ) from None
            if not fields:  # blank line
                continue
            if header is None:
                header, header_line = fields, start
                seen: dict[str, int] = {}
                for col in header:
                    if col in seen:
                        raise InputError(
                            "duplicate column name in header", file=shown, line=start, field=col
                        )
                    seen[col] = 1
                continue
            if len(fields) != len(header):
                expected = (
                    f"expected {len(header)} fields (as in the header on line {header_line}), "
                    f"found {len(fields)}"
                )
                if len(fields) < len(header):
                    raise InputError(
                        f"{expected}: this row has no value for column {_clip(header[len(fields)])}"
                        + (" or the columns after it" if len(fields) + 1 < len(header) else ""),
                        file=shown,
                        line=start,
                        field=header[len(fields)],
                    )
                raise InputError(
                    f"{expected}: {len(fields) - len(header)} extra value(s) from column "
                    f"{len(header) + 1} on, after the last column {_clip(header[-1])} "
                    f"(an unquoted {_clip(delimiter)} inside a value?)",
                    file=shown,
                    line=start,
                )
            records.append(
                _Record(line=start, row=len(records) + 1, values=dict(zip(header, fields)))
            )
    assert header is not None
    if not records:
        raise InputError("file has a header but no data rows", file=shown)
    return header, records, header_line


def _csv_error(
    exc: csv.Error,
    text: str,
    shown: str,
    delimiter: str,
    start: int,
    read_to: int,
    header: list[str] | None,
) -> InputError:
    """InputError for a csv.Error in the record starting on line ``start``, naming the field."""
    idx = _csv_error_field(text, _line_offset(text, start), delimiter)
    reason = str(exc)
    if "unexpected end of data" in reason:
        reason = "a quoted value is never closed (unbalanced '\"'; read to the end of the file)"
    elif "expected after" in reason:
        reason = (
            f"text after the closing quote of a quoted value ({exc}); "
            "double a '\"' inside a quoted value"
        )
    field = None
    where = ""
    if idx is not None:
        if header is not None and idx < len(header):
            field = header[idx]
        else:
            where = f" in column {idx + 1}" + (" of the header" if header is None else "")
    return InputError(
        f"malformed CSV in the record starting here{where} (read up to line {read_to}): {reason}",
        file=shown,
        line=start,
        field=field,
    )


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _json_member_at(line: str, pos: int | None = None) -> str | None:
    """Best effort: the top-level key of the JSON object in ``line`` whose value fails to
    parse, or (with ``pos``) whose value spans character offset ``pos``. None when the
    fault is not inside a member's value (e.g. a broken key, or text after the object)."""
    decoder = json.JSONDecoder()
    n = len(line)
    i = _JSON_WS.match(line, 0).end()
    if i >= n or line[i] != "{":
        return None
    i += 1
    while True:
        i = _JSON_WS.match(line, i).end()
        if i >= n or line[i] != '"':
            return None
        try:
            key, i = json.decoder.scanstring(line, i + 1)
        except ValueError:
            return None
        if pos is not None and pos < i:
            return None  # inside the key
        i = _JSON_WS.match(line, i).end()
        if i >= n or line[i] != ":":
            return key
        i = _JSON_WS.match(line, i + 1).end()
        try:
            _, i = decoder.raw_decode(line, i)
        except (ValueError, RecursionError):
            return key
        if pos is not None and pos < i:
            return key
        i = _JSON_WS.match(line, i).end()
        if i < n and line[i] == ",":
            i += 1
            continue
        return None


def _surrogate_member(obj: dict[str, Any]) -> str | None:
    """The first top-level key whose name or value has a lone surrogate (from a \\udXXX escape)."""
    for key, value in obj.items():
        stack = [key, value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                if _SURROGATE.search(v):
                    return key
            elif isinstance(v, dict):
                stack.extend(v.keys())
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
    return None


def _parse_jsonl(text: str, shown: str) -> tuple[list[str], list[_Record]]:
    columns: dict[str, None] = {}
    records: list[_Record] = []
    # Split on "\n" only: JSON strings may legally contain raw U+2028 etc., which
    # str.splitlines() would treat as line breaks.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_unique_pairs)
        except _DuplicateKey as exc:
            raise InputError(
                "duplicate key: it appears more than once in this JSON object",
                file=shown,
                line=lineno,
                field=exc.key,
            ) from None
        except json.JSONDecodeError as exc:
            where = "text after the end of the JSON value" if exc.msg == "Extra data" else exc.msg
            raise InputError(
                f"invalid JSON: {where} (column {exc.colno})",
                file=shown,
                line=lineno,
                field=_json_member_at(line),
            ) from None
        except RecursionError:
            raise InputError(
                "invalid JSON: arrays/objects nested too deeply",
                file=shown,
                line=lineno,
                field=_json_member_at(line),
            ) from None
        except ValueError as exc:  # e.g. an integer with more digits than Python converts
            raise InputError(
                f"invalid JSON number: {str(exc).split(';')[0]}",
                file=shown,
                line=lineno,
                field=_json_member_at(line),
            ) from None
        if not isinstance(obj, dict):
            raise InputError(
                f"expected a JSON object on each line, found a JSON {_json_type(obj)}",
                file=shown,
                line=lineno,
            )
        if "\\u" in line:
            bad = _surrogate_member(obj)
            if bad is not None:
                raise InputError(
                    "invalid Unicode: a \\udXXX escape for a lone surrogate half "
                    "encodes no character",
                    file=shown,
                    line=lineno,
                    field=bad,
                )
        for key in obj:
            columns.setdefault(key, None)
        records.append(_Record(line=lineno, row=len(records) + 1, values=obj))
    if not records:
        raise InputError("file is empty (no JSON records)", file=shown)
    return list(columns), records


def _format_of(given: str, shown: str) -> str:
    suffix = Path(given).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise InputError(
        f"cannot tell the file format from the extension {suffix or '(none)'!r}; "
        "use .csv, .tsv or .jsonl",
        file=shown,
    )


def _load_table(given: Any, base_dir: Path, key_path: str, fmt: str | None = None) -> _Table:
    given, path = _resolve(given, base_dir, key_path)
    shown = os.fspath(path)
    if fmt is None:
        fmt = _format_of(given, shown)
    text, sha = _read_text(path, shown, fmt)
    header_line = None
    if fmt == "jsonl":
        columns, records = _parse_jsonl(text, shown)
    else:
        columns, records, header_line = _parse_delimited_table(
            text, shown, "\t" if fmt == "tsv" else ","
        )
    return _Table(
        given=given,
        file=shown,
        fmt=fmt,
        sha256=sha,
        columns=columns,
        records=records,
        header_line=header_line,
    )


# ---------------------------------------------------------------------------
# spec handling


class _Spec:
    """Typed access to one dataset spec, with ConfigErrors naming ``datasets.<name>.<key>``."""

    def __init__(self, name: str, spec: Any, base_dir: Path) -> None:
        self.name = name
        if not isinstance(spec, dict):
            raise ConfigError(self.key(), f"expected a mapping, got {type(spec).__name__}")
        self.spec = spec
        self.base_dir = base_dir

    def key(self, *parts: Any) -> str:
        path = f"datasets.{self.name}"
        for part in parts:
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        return path

    def check_keys(self, allowed: Iterable[str]) -> None:
        allowed = set(allowed) | {
            "kind",
            "description",
            "filters",
            "max_per_class",
            "min_per_class",
            "seed",
        }
        for key in self.spec:
            if key not in allowed:
                raise ConfigError(
                    self.key(key),
                    f"unknown key for kind {self.spec.get('kind')!r}; allowed: {sorted(allowed)}",
                )

    def required(self, key: str) -> Any:
        if self.spec.get(key) is None:
            raise ConfigError(self.key(key), "is required")
        return self.spec[key]

    def str_opt(self, key: str, default: str | None) -> str | None:
        value = self.spec.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ConfigError(self.key(key), f"expected a non-empty string, got {value!r}")
        return value

    def int_opt(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.spec.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ConfigError(self.key(key), f"expected an integer >= {minimum}, got {value!r}")
        return int(value)

    def filters(self) -> dict[str, list[Any]]:
        raw = self.spec.get("filters")
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise ConfigError(
                self.key("filters"), "expected a mapping of column -> value or list of values"
            )
        out: dict[str, list[Any]] = {}
        for col, allowed in raw.items():
            values = list(allowed) if isinstance(allowed, (list, tuple)) else [allowed]
            for v in values:
                if v is not None and not isinstance(v, (str, int, float, bool)):
                    raise ConfigError(self.key("filters", col), f"expected scalars, got {v!r}")
            if not values:
                raise ConfigError(self.key("filters", col), "empty list of allowed values")
            out[str(col)] = values
        return out

    def caps(self, default: Any, classes: Iterable[str] | None) -> Callable[[str], int | None]:
        """Parse ``max_per_class``; returns label -> cap (None = keep all)."""
        raw = self.spec["max_per_class"] if "max_per_class" in self.spec else default
        key = self.key("max_per_class")
        if raw is None:
            return lambda label: None
        if isinstance(raw, (int, np.integer)) and not isinstance(raw, bool):
            if raw < 0:
                raise ConfigError(key, f"expected an integer >= 0, got {raw!r}")
            cap = int(raw)
            return lambda label: cap
        if not isinstance(raw, dict):
            raise ConfigError(
                key, f"expected an integer, null or a mapping label -> integer, got {raw!r}"
            )
        caps: dict[str, int | None] = {}
        for label, value in raw.items():
            label_s = scalar_str(label) if isinstance(label, (bool, int, float)) else str(label)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0
            ):
                raise ConfigError(
                    f"{key}.{label_s}", f"expected an integer >= 0 or null, got {value!r}"
                )
            caps[label_s] = None if value is None else int(value)
        if classes is not None:
            known = list(classes)
            for label_s in caps:
                if label_s not in known:
                    raise ConfigError(
                        f"{key}.{label_s}",
                        f"not a class of this dataset; classes: {_short(known, 50)}",
                    )
        return lambda label: caps.get(label)


def _filter_match(value: Any, wanted: Any) -> bool:
    """Does a source value match one allowed filter value? Raises ValueError on a bad boolean."""
    if wanted is None:
        return scalar_str(value) in (None, "")
    if isinstance(wanted, bool):
        return parse_bool(value) == wanted
    if isinstance(wanted, (int, float)):
        if isinstance(value, bool):
            return False
        try:
            return float(value) == float(wanted)
        except (TypeError, ValueError):
            return False
    try:
        return scalar_str(value) == wanted
    except TypeError:
        return False


def _apply_filters(table: _Table, filters: dict[str, list[Any]], note: str = "") -> list[_Record]:
    """Records of ``table`` passing all filters (in file order); errors name file/line/field."""
    for col in filters:
        if col not in table.columns:
            raise InputError(
                f"filter column not found{note}; columns found: {_short(table.columns, 50)}",
                file=table.file,
                field=col,
            )
    if not filters:
        return list(table.records)
    kept = []
    for rec in table.records:
        ok = True
        for col, allowed in filters.items():
            value = table.get(rec, col)
            try:
                if not any(_filter_match(value, w) for w in allowed):
                    ok = False
                    break
            except ValueError as exc:
                raise InputError(
                    f"cannot apply boolean filter: {exc}", file=table.file, line=rec.line, field=col
                ) from None
        if ok:
            kept.append(rec)
    if not kept:
        raise InputError(
            f"filters {filters!r} leave no rows (from {len(table.records)})", file=table.file
        )
    return kept


def _select(
    units_by_class: dict[str, list[Any]], cap_of: Callable[[str], int | None], seed: int
) -> dict[str, list[Any]]:
    """Keep at most ``cap_of(label)`` units per class: a seeded random subset, in original order.

    Each class gets its own generator seeded by (seed, crc32(label)), so a class's choice
    does not depend on which other classes exist.
    """
    out = {}
    for label, units in units_by_class.items():
        cap = cap_of(label)
        if cap is None or len(units) <= cap:
            out[label] = list(units)
            continue
        rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
        keep = sorted(rng.permutation(len(units))[:cap].tolist())
        out[label] = [units[i] for i in keep]
    return out


def _select_rows(
    rows_by_class: dict[str, list[dict]], cap_of: Callable[[str], int | None], seed: int
) -> list[dict]:
    """:func:`_select` on row dicts, then back to source order (their ``_order`` key, dropped)."""
    chosen = _select(rows_by_class, cap_of, seed)
    rows = sorted((r for rs in chosen.values() for r in rs), key=lambda r: r["_order"])
    for r in rows:
        del r["_order"]
    return rows


def _check_min(
    counts: dict[str, int], minimum: int, *, file: str | None, spec: _Spec, what: str = "rows"
) -> None:
    low = {label: n for label, n in counts.items() if n < minimum}
    if low:
        msg = (
            f"dataset '{spec.name}': fewer than min_per_class={minimum} {what} in class(es) "
            f"{_short(sorted(low), 50)} after filters and caps; counts per class: {counts}"
        )
        if file is None:
            raise ConfigError(spec.key("min_per_class"), msg)
        raise InputError(msg, file=file)


def _check_two_classes(
    counts: dict[str, int], *, file: str | None, field: str | None, spec: _Spec
) -> None:
    """Probes need two classes: a single-class dataset fails at ingest, not after caching."""
    present = sorted(c for c, n in counts.items() if n > 0)
    if len(present) >= 2:
        return
    msg = (
        f"dataset '{spec.name}' has {len(present)} class(es) {_short(present, 5)} after filters "
        "and caps; probes need at least two: check the label column, the filters and max_per_class"
    )
    if file is None:
        raise ConfigError(spec.key("tasks"), msg)
    raise InputError(msg, file=file, field=field)


def _order_classes(labels: Iterable[str], positive: str | None) -> list[str]:
    classes = sorted(set(labels))
    if positive is not None and positive in classes:
        classes.remove(positive)
        classes.append(positive)
    return classes


def _template_fields(template: Any, allowed: set[str], key_path: str) -> str:
    if not isinstance(template, str) or not template:
        raise ConfigError(key_path, f"expected a non-empty format string, got {template!r}")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(key_path, f"invalid format string {template!r}: {exc}") from None
    for _, fname, _, _ in parsed:
        if fname is None:
            continue
        if fname not in allowed:
            shown = "{" + fname + "}"
            raise ConfigError(
                key_path,
                f"unknown placeholder {shown} in {template!r}; allowed: "
                f"{', '.join('{' + a + '}' for a in sorted(allowed))}",
            )
    try:  # values are always strings; catch bad conversions / format specs now, not mid-build
        template.format(**{name: "x" for name in allowed})
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ConfigError(key_path, f"invalid format string {template!r}: {exc}") from None
    return template


# ---------------------------------------------------------------------------
# kinds


@dataclass
class _Built:
    rows: list[dict[str, Any]]
    columns: list[str]  # provenance columns after the core ones
    classes: list[str]  # all classes (binary kinds: both, even if empty)
    positive: str | None
    inputs: dict[str, str]
    min_file: str | None  # file named by a min_per_class error (None -> ConfigError)
    min_per_class: int
    label_field: str | None = None  # the input column the labels come from (named in errors)


def _build_phase2(spec: _Spec) -> _Built:
    """Build the faithful/unfaithful dataset of a phase2 scores table and its responses."""
    fields, variants, text_mode = _phase2_options(spec)
    marker = _marker_of(spec, text_mode == "question_response")
    sep = _response_separator(spec)
    filters = spec.filters()
    classes = ["unfaithful", "faithful"]
    cap_of = spec.caps({"faithful": 30, "unfaithful": 20}, classes)
    min_n = spec.int_opt("min_per_class", 10)
    seed = spec.int_opt("seed", 0)

    scores = _load_table(spec.required("scores"), spec.base_dir, spec.key("scores"))
    responses = _load_table(
        spec.required("responses"), spec.base_dir, spec.key("responses"), fmt="jsonl"
    )
    f_pid, f_faith = fields["pair_id"], fields["is_faithful"]
    scores.require_columns([f_pid, f_faith])

    # All scored pair ids (before filters) decide which responses are orphans.
    all_scored = {scores.get_str(rec, f_pid) for rec in scores.records}
    pair_label, pair_line = _phase2_pair_labels(scores, filters, f_pid, f_faith)
    by_key, orphans = _phase2_responses(responses, f_pid, fields["variant"], all_scored)
    missing = [f"{pid}:{v}" for pid in pair_line for v in variants if (pid, v) not in by_key]
    if missing or orphans:
        _phase2_mismatch(scores, responses, variants, missing, orphans, f_pid)

    units = {label: [pid for pid in pair_line if pair_label[pid] == label] for label in classes}
    chosen = _select(units, cap_of, seed)
    chosen_set = {pid for pids in chosen.values() for pid in pids}
    rows = []
    for pid in pair_line:  # scores order
        if pid not in chosen_set:
            continue
        for variant in variants:
            rec = by_key[(pid, variant)]
            text = _phase2_text(responses, rec, fields, text_mode, sep)
            row = {
                "prompt_id": f"{pid}:{variant}",
                "text": text,
                "label": pair_label[pid],
                "group": pid,
                "pair_id": pid,
                "variant": variant,
                "source_file": responses.given,
                "source_line": rec.line,
                "scores_line": pair_line[pid],
            }
            if marker is not None:
                question = responses.get_str(rec, fields["question"])
                row.update(
                    _offsets(responses, rec, fields["response"], text, question + sep, marker)
                )
            rows.append(row)
    return _Built(
        rows=rows,
        columns=["pair_id", "variant", "source_file", "source_line", "scores_line"]
        + (list(OFFSET_COLUMNS) if marker is not None else []),
        classes=classes,
        positive="faithful",
        label_field=f_faith,
        inputs={scores.given: scores.sha256, responses.given: responses.sha256},
        min_file=scores.file,
        min_per_class=min_n,
    )


def _phase2_options(spec: _Spec) -> tuple[dict[str, str], list[str], str]:
    """Check the phase2 options: (field -> column, variant names, text mode)."""
    spec.check_keys(
        {"scores", "responses", "fields", "variants", "text", "answer_marker"}
        | {"response_separator"}
    )
    fields = dict(PHASE2_DEFAULT_FIELDS)
    raw_fields = spec.spec.get("fields") or {}
    if not isinstance(raw_fields, dict):
        raise ConfigError(spec.key("fields"), "expected a mapping of field -> column name")
    for k, v in raw_fields.items():
        if k not in PHASE2_DEFAULT_FIELDS:
            raise ConfigError(
                spec.key("fields", k), f"unknown field; known: {sorted(PHASE2_DEFAULT_FIELDS)}"
            )
        if not isinstance(v, str) or not v:
            raise ConfigError(spec.key("fields", k), f"expected a column name, got {v!r}")
        fields[k] = v
    variants = spec.spec.get("variants", ["q1"])
    if isinstance(variants, str):
        variants = [variants]
    if (
        not isinstance(variants, (list, tuple))
        or not variants
        or not all(isinstance(v, str) and v for v in variants)
    ):
        raise ConfigError(
            spec.key("variants"), f"expected a non-empty list of variant names, got {variants!r}"
        )
    if len(set(variants)) != len(variants):
        raise ConfigError(spec.key("variants"), f"duplicate variants in {variants!r}")
    text_mode = spec.spec.get("text", "question")
    if text_mode not in PHASE2_TEXT_MODES:
        raise ConfigError(
            spec.key("text"),
            f"unknown text mode {text_mode!r}; expected one of {list(PHASE2_TEXT_MODES)}",
        )
    return fields, variants, text_mode


def _first_occurrence(table, rec, field: str, first_line: dict[str, int], what: str) -> str:
    """``rec``'s value of ``field``, its line noted in ``first_line``; a value seen on an earlier
    line is an error naming both lines."""
    value = table.get_str(rec, field)
    if value in first_line:
        raise InputError(
            f"duplicate {what} {_clip(value)} "
            f"(first on line {first_line[value]}, again on line {rec.line})",
            file=table.file,
            line=rec.line,
            field=field,
        )
    first_line[value] = rec.line
    return value


def _phase2_pair_labels(scores, filters, f_pid, f_faith) -> tuple[dict[str, str], dict[str, int]]:
    """Label and line of every kept scored pair id, in scores order (duplicates are errors)."""
    kept = _apply_filters(scores, filters, note=" (phase2 filters apply to the scores table)")
    pair_label: dict[str, str] = {}
    pair_line: dict[str, int] = {}
    for rec in kept:
        pid = _first_occurrence(scores, rec, f_pid, pair_line, "pair_id")
        pair_label[pid] = "faithful" if scores.get_bool(rec, f_faith) else "unfaithful"
    return pair_label, pair_line


def _phase2_responses(responses, f_pid, f_var, all_scored):
    """Response records by (pair_id, variant), and the pair ids without any score."""
    by_key: dict[tuple[str, str], _Record] = {}
    orphans: dict[str, None] = {}
    for rec in responses.records:
        pid = responses.get_str(rec, f_pid)
        variant = responses.get_str(rec, f_var)
        prev = by_key.get((pid, variant))
        if prev is not None:
            raise InputError(
                f"duplicate record for pair_id {_clip(pid)}, variant {_clip(variant)} "
                f"(first on line {prev.line}, again on line {rec.line})",
                file=responses.file,
                line=rec.line,
                field=f_pid,
            )
        by_key[(pid, variant)] = rec
        if pid not in all_scored:
            orphans.setdefault(pid, None)
    return by_key, orphans


def _phase2_mismatch(scores, responses, variants, missing, orphans, f_pid) -> NoReturn:
    """Raise the error for scored pairs without responses and responses without scores."""
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} scored pair/variant(s) have no record in {responses.file} "
            f"(first: {_short(missing)})"
        )
    if orphans:
        parts.append(
            f"{len(orphans)} pair_id(s) in {responses.file} have no score in {scores.file} "
            f"(first: {_short(orphans)})"
        )
    raise InputError(
        f"scores and responses do not match (variants {variants}): " + "; ".join(parts),
        file=scores.file,
        field=f_pid,
    )


def _response_separator(spec: _Spec) -> str:
    """What joins the question and the response (``response_separator``, default a newline).

    A model reads its own chain of thought best after the separator it was trained or prompted
    with: the demo model saw ``"...? Work it out. Both numbers..."`` (a space) and answers
    off-distribution after a newline."""
    sep = spec.spec.get("response_separator", "\n")
    if not isinstance(sep, str):
        raise ConfigError(spec.key("response_separator"), f"expected a string, got {sep!r}")
    return sep


def _phase2_text(responses, rec, fields, text_mode, sep: str = "\n") -> str:
    """The prompt text of one response record: its question, or question + sep + response."""
    question = responses.get_str(rec, fields["question"])
    if text_mode != "question_response":
        return question
    f_resp = fields["response"]
    response = responses.get_str(rec, f_resp, required=False)
    if response is None or not response.strip():
        raise InputError(
            "response is missing or empty (needed for text: question_response)",
            file=responses.file,
            line=rec.line,
            field=f_resp,
        )
    return question + sep + response


def _marker_of(spec: _Spec, has_response: bool) -> re.Pattern | None:
    """The compiled answer marker of a dataset whose text holds a response (None: no offsets).

    Offsets are recorded when ``answer_marker`` is set (the workflow sets it, default
    ``Answer:``, for every dataset in ``cot.datasets``); a marker without a response is an error."""
    marker = spec.spec.get("answer_marker")
    if marker is None:
        return None
    if not has_response:
        raise ConfigError(
            spec.key("answer_marker"),
            "an answer marker needs the response in the text (phase2: text: question_response; "
            "labelled: response_field)",
        )
    if not isinstance(marker, str) or not marker:
        raise ConfigError(spec.key("answer_marker"), f"expected a regex, got {marker!r}")
    return compile_marker(marker, spec.key("answer_marker"))


def _offsets(table, rec, field: str, text: str, prefix: str, marker) -> dict[str, Any]:
    """Reasoning and answer offsets of ``text`` = ``prefix`` (question and separator) + response."""
    return response_offsets(
        len(prefix), text[len(prefix) :], marker, file=table.file, line=rec.line, field=field
    )


def _build_facts(spec: _Spec) -> _Built:
    spec.check_keys({"path", "templates"})
    templates = spec.required("templates")
    if not isinstance(templates, dict) or not templates:
        raise ConfigError(spec.key("templates"), "expected a mapping relation -> format string")
    templates = {
        str(rel): _template_fields(t, {"subject", "object"}, spec.key("templates", str(rel)))
        for rel, t in templates.items()
    }
    filters = spec.filters()
    classes = ["false", "true"]
    cap_of = spec.caps(None, classes)
    min_n = spec.int_opt("min_per_class", 2)
    seed = spec.int_opt("seed", 0)

    table = _load_table(spec.required("path"), spec.base_dir, spec.key("path"))
    table.require_columns(["subject", "relation", "object", "is_true"])
    index_of = {id(rec): i for i, rec in enumerate(table.records)}
    kept = _apply_filters(table, filters)
    by_class: dict[str, list[dict[str, Any]]] = {c: [] for c in classes}
    for rec in kept:
        subject = table.get_str(rec, "subject")
        relation = table.get_str(rec, "relation")
        obj = table.get_str(rec, "object")
        label = "true" if table.get_bool(rec, "is_true") else "false"
        if relation not in templates:
            raise InputError(
                f"no template for relation {_clip(relation)}; configured relations: "
                f"{_short(templates, 50)}",
                file=table.file,
                line=rec.line,
                field="relation",
            )
        i = index_of[id(rec)]
        by_class[label].append(
            {
                "prompt_id": f"fact_{i:04d}",
                "text": templates[relation].format(subject=subject, object=obj),
                "label": label,
                "group": f"{subject}|{relation}",
                "subject": subject,
                "relation": relation,
                "object": obj,
                "source_file": table.given,
                "source_line": rec.line,
                "_order": i,
            }
        )
    rows = _select_rows(by_class, cap_of, seed)
    return _Built(
        rows=rows,
        columns=["subject", "relation", "object", "source_file", "source_line"],
        classes=classes,
        positive="true",
        label_field="is_true",
        inputs={table.given: table.sha256},
        min_file=table.file,
        min_per_class=min_n,
    )


def _build_task_grid(spec: _Spec) -> _Built:
    """Build the task-grid dataset: every task's template filled with every pair."""
    spec.check_keys({"tasks", "pairs", "template"})
    tasks = _task_grid_tasks(spec)
    pairs = _task_grid_pairs(spec)
    template = _template_fields(
        spec.spec.get("template") or DEFAULT_TASK_TEMPLATE, {"a", "b", "task"}, spec.key("template")
    )
    filters = spec.filters()
    cap_of = spec.caps(None, tasks)
    min_n = spec.int_opt("min_per_class", 2)
    seed = spec.int_opt("seed", 0)

    columns = ["task", "a", "b"]
    all_rows = [
        {
            "prompt_id": f"{task}:{a}_{b}",
            "text": template.format(a=a, b=b, task=task),
            "label": task,
            "group": f"{a}_{b}",
            "task": task,
            "a": a,
            "b": b,
        }
        for task in tasks
        for a, b in pairs
    ]
    rows = _task_grid_filter(spec, filters, all_rows, columns)
    by_class = {t: [r for r in rows if r["task"] == t] for t in tasks}
    chosen = _select({t: rs for t, rs in by_class.items() if rs}, cap_of, seed)
    keep = {r["prompt_id"] for rs in chosen.values() for r in rs}
    rows = [r for r in rows if r["prompt_id"] in keep]
    return _Built(
        rows=rows,
        columns=columns,
        classes=sorted({r["label"] for r in rows}),
        positive=None,
        inputs={},
        min_file=None,
        min_per_class=min_n,
    )


def _task_grid_tasks(spec: _Spec) -> list[str]:
    """Check the task_grid ``tasks``: a non-empty list of distinct non-empty names."""
    tasks = spec.required("tasks")
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ConfigError(
            spec.key("tasks"), f"expected a non-empty list of task names, got {tasks!r}"
        )
    for i, t in enumerate(tasks):
        if not isinstance(t, str) or not t.strip():
            raise ConfigError(spec.key("tasks", i), f"expected a non-empty string, got {t!r}")
        if t in tasks[:i]:
            raise ConfigError(spec.key("tasks", i), f"duplicate task {t!r}")
    return tasks


def _task_grid_pairs(spec: _Spec) -> list[tuple[str, str]]:
    """Check the task_grid ``pairs``: distinct [a, b] pairs of numbers or strings, as text."""
    pairs_raw = spec.required("pairs")
    if not isinstance(pairs_raw, (list, tuple)) or not pairs_raw:
        raise ConfigError(
            spec.key("pairs"), f"expected a non-empty list of [a, b] pairs, got {pairs_raw!r}"
        )
    pairs: list[tuple[str, str]] = []
    for i, p in enumerate(pairs_raw):
        if (
            not isinstance(p, (list, tuple))
            or len(p) != 2
            or not all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in p)
        ):
            raise ConfigError(
                spec.key("pairs", i), f"expected a pair [a, b] of numbers or strings, got {p!r}"
            )
        pair = (scalar_str(p[0]) or "", scalar_str(p[1]) or "")
        if not pair[0].strip() or not pair[1].strip():
            raise ConfigError(spec.key("pairs", i), f"empty value in pair {p!r}")
        if pair in pairs:
            raise ConfigError(spec.key("pairs", i), f"duplicate pair {list(p)!r}")
        pairs.append(pair)
    return pairs


def _task_grid_filter(spec: _Spec, filters, all_rows, columns) -> list[dict[str, Any]]:
    """The task-grid rows the filters keep (an error if none)."""
    rows = all_rows
    for col, allowed in filters.items():
        if col not in ("prompt_id", "text", "label", "group", *columns):
            raise ConfigError(
                spec.key("filters", col),
                f"unknown column; task_grid columns: {['label', 'group', *columns]}",
            )
        try:
            rows = [r for r in rows if any(_filter_match(r[col], w) for w in allowed)]
        except ValueError as exc:
            raise ConfigError(spec.key("filters", col), str(exc)) from None
    if not rows:
        raise ConfigError(
            spec.key("filters"), f"filters {filters!r} leave no rows (from {len(all_rows)})"
        )
    return rows


def _build_labelled(spec: _Spec) -> _Built:
    spec.check_keys(
        {"path", "text_field", "label_field", "group_field", "id_field", "positive_class"}
        | {"response_field", "answer_marker", "response_separator"}
    )
    text_field = spec.str_opt("text_field", "text")
    response_field = spec.str_opt("response_field", None)
    marker = _marker_of(spec, response_field is not None)
    sep = _response_separator(spec)
    label_field = spec.str_opt("label_field", "label")
    group_field = spec.str_opt("group_field", None)
    id_field = spec.str_opt("id_field", None)
    filters = spec.filters()
    min_n = spec.int_opt("min_per_class", 2)
    seed = spec.int_opt("seed", 0)

    table = _load_table(spec.required("path"), spec.base_dir, spec.key("path"))
    table.require_columns(
        [
            f
            for f in (text_field, label_field, group_field, id_field, response_field)
            if f is not None
        ]
    )
    # One spelling per class (see normalise_labels); class names known to the file (before
    # filters) catch typos in max_per_class.
    raw = []
    for rec in table.records:
        table.get_str(rec, label_field)  # an empty or null label is an error naming its line
        raw.append((rec.line, table.get(rec, label_field)))
    label_of = dict(zip(map(id, table.records), normalise_labels(raw, table.file, label_field)))
    file_labels = list(dict.fromkeys(label_of.values()))
    cap_of = spec.caps(None, file_labels)
    index_of = {id(rec): i for i, rec in enumerate(table.records)}
    id_line: dict[str, int] = {}
    if id_field is not None:  # ids must be unique across the whole file
        for rec in table.records:
            _first_occurrence(table, rec, id_field, id_line, "id")
    kept = _apply_filters(table, filters)
    by_class: dict[str, list[dict[str, Any]]] = {}
    for rec in kept:
        i = index_of[id(rec)]
        question = table.get_str(rec, text_field)
        text = question
        if response_field is not None:
            text = question + sep + table.get_str(rec, response_field)
        label = label_of[id(rec)]
        pid = table.get_str(rec, id_field) if id_field is not None else f"row_{i:04d}"
        group = table.get_str(rec, group_field) if group_field is not None else pid
        row = {
            "prompt_id": pid,
            "text": text,
            "label": label,
            "group": group,
            "source_file": table.given,
            "source_line": rec.line,
            "_order": i,
        }
        if marker is not None:
            row.update(_offsets(table, rec, response_field, text, question + sep, marker))
        by_class.setdefault(label, []).append(row)
    rows = _select_rows(by_class, cap_of, seed)
    return _Built(
        rows=rows,
        columns=["source_file", "source_line"]
        + (list(OFFSET_COLUMNS) if marker is not None else []),
        classes=sorted(by_class),
        positive=_labelled_positive(spec, sorted(by_class), table.given, label_field),
        inputs={table.given: table.sha256},
        min_file=table.file,
        min_per_class=min_n,
        label_field=label_field,
    )


def _labelled_positive(spec: _Spec, classes: list[str], file: str, field: str) -> str | None:
    """The configured positive class of a labelled dataset: one of exactly two classes (a
    direction then points towards it; without it, mass-mean steering has no side to take)."""
    positive = spec.str_opt("positive_class", None)
    if positive is None:
        return None
    if len(classes) != 2:
        raise ConfigError(
            spec.key("positive_class"),
            f"applies to two classes; {file} (field '{field}') has {len(classes)}: {classes}",
        )
    if positive not in classes:
        raise ConfigError(
            spec.key("positive_class"),
            f"{positive!r} is not a class of {file} (field '{field}'): {classes}",
        )
    return positive


_BUILDERS = {
    "phase2": _build_phase2,
    "facts": _build_facts,
    "task_grid": _build_task_grid,
    "labelled": _build_labelled,
}


# ---------------------------------------------------------------------------
# public API


def build_prompt_table(
    name: str, spec: dict, base_dir: str | os.PathLike = ".", *, min_classes: int = 1
) -> tuple[pd.DataFrame, dict]:
    """Build the prompt table for dataset ``name`` from its config ``spec``.

    Relative paths in ``spec`` are resolved against ``base_dir``. Returns the table
    (columns ``prompt_id, text, label, group`` then provenance columns; deterministic row
    order) and a summary dict with keys ``dataset, kind, n_prompts, classes,
    positive_class, counts, n_groups, inputs``. ``classes`` is sorted with the positive
    class last for the binary kinds (phase2: ``faithful``; facts: ``true``).

    Raises :class:`InputError` for bad input files and :class:`ConfigError` for a bad spec; with
    ``min_classes=2`` (the workflow: probes need two classes) a table with one class is an error
    naming the input file and its label column. Nothing is written to disk.
    """
    sp = _Spec(str(name), spec, Path(base_dir))
    kind = spec.get("kind")
    if kind not in _BUILDERS:
        raise ConfigError(
            sp.key("kind"), f"unknown dataset kind {kind!r}; expected one of {list(KINDS)}"
        )
    built = _BUILDERS[kind](sp)

    counts = {c: 0 for c in built.classes}
    for r in built.rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    classes = _order_classes(counts, built.positive)
    counts = {c: counts[c] for c in classes}
    _check_min(counts, built.min_per_class, file=built.min_file, spec=sp)
    if min_classes > 1:
        _check_two_classes(counts, file=built.min_file, field=built.label_field, spec=sp)

    columns = [*CORE_COLUMNS, *built.columns]
    df = pd.DataFrame(built.rows, columns=columns)
    for col in columns:
        if col in INT_COLUMNS:
            df[col] = df[col].astype("int64")
        else:
            df[col] = df[col].astype(str)
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):  # cannot happen for the built-in id schemes; guard anyway
        raise InputError(f"dataset '{sp.name}': duplicate prompt_id(s) {_short(dup.tolist())}")
    summary = {
        "dataset": sp.name,
        "kind": kind,
        "n_prompts": int(len(df)),
        "classes": classes,
        "positive_class": built.positive,
        "counts": counts,
        "n_groups": int(df["group"].nunique()),
        "inputs": built.inputs,
    }
    return df, summary


def texts_digest(df: pd.DataFrame) -> str:
    """SHA-256 of the (prompt_id, text) pairs in table order: what cached activations depend on
    (not the labels, which the per-layer files take from the table)."""
    h = hashlib.sha256()
    for pid, text in zip(df["prompt_id"], df["text"]):
        h.update(json.dumps([str(pid), str(text)], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def dry_run_check(
    name: str,
    spec: dict,
    base_dir: str | os.PathLike = ".",
    cache_dir: str | os.PathLike | None = None,
    tokenizers: dict[str, str | os.PathLike] | None = None,
    texts_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Build dataset ``name`` as ``prepare_dataset`` will (every input, label and class check,
    before any job runs) and return ``{"texts_sha256", "n_prompts", "longest"}``; ``longest`` maps
    each model of ``tokenizers`` (name -> tokenizer.json) to ``[tokens, prompt_id]`` of the longest
    prompt (without BOS).

    The result is remembered in ``cache_dir`` under a key of the spec and the sizes and modification
    times of the input and tokenizer files, so a repeated dry run does not read them again.

    ``texts_path``: where to keep the dataset's prompt ids and texts (the caching job's input, so
    that the forward pass depends on the texts and not on the labels); rewritten only when they
    change, so its modification time says when the texts last changed."""
    from layerscope.config import dataset_files

    tokenizers = dict(sorted((tokenizers or {}).items()))
    files = [Path(base_dir) / f for f in dataset_files(spec)] + [
        Path(t) for t in tokenizers.values()
    ]
    key = hashlib.sha256(
        json.dumps(
            [name, spec, list(tokenizers), [(str(f), *_stat(f)) for f in files]],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:32]
    memo = Path(cache_dir) / f"{name}-{key}.json" if cache_dir is not None else None
    if memo is not None and memo.is_file() and (texts_path is None or Path(texts_path).is_file()):
        return json.loads(memo.read_text(encoding="utf-8"))
    df, _ = build_prompt_table(name, spec, base_dir, min_classes=2)
    if texts_path is not None:
        _write_if_changed(
            texts_path, df[["prompt_id", "text"]].to_csv(index=False, lineterminator="\n")
        )
    result = {
        "texts_sha256": texts_digest(df),
        "n_prompts": int(len(df)),
        "longest": {m: _longest(tok, df) for m, tok in tokenizers.items()},
    }
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_json(memo, result)
    return result


def _longest(tokenizer_json: str | os.PathLike, df: pd.DataFrame) -> list:
    """[token count, prompt id] of the longest prompt under a fast tokenizer (no special tokens)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.fspath(tokenizer_json))
    lengths = [len(e.ids) for e in tok.encode_batch(df["text"].tolist(), add_special_tokens=False)]
    i = int(np.argmax(lengths))
    return [int(lengths[i]), str(df["prompt_id"].iloc[i])]


def _write_if_changed(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def write_prompt_table(
    df: pd.DataFrame, summary: dict, table_path: str | os.PathLike, summary_path: str | os.PathLike
) -> None:
    """Write the table as UTF-8 CSV and the summary as JSON, both via temp file + rename.

    Both files are fully written to temporaries before either is renamed into place, so
    a failure while writing leaves neither target behind (nor any temporary).
    """
    missing = [c for c in CORE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"prompt table lacks core column(s) {missing}")
    if df["prompt_id"].duplicated().any():
        raise ValueError("prompt table has duplicate prompt_id values")
    # Python's csv writer quotes "\n" but not a lone "\r" when the line terminator is
    # "\n", and an unquoted "\r" reads back as a line break. Quote every string cell
    # in that (rare) case; otherwise keep the minimal quoting that is easier to read.
    has_cr = any(
        df[col].map(lambda v: isinstance(v, str) and "\r" in v).any()
        for col in df.columns
        if not pd.api.types.is_numeric_dtype(df[col])
    ) or any("\r" in str(c) for c in df.columns)
    quoting = csv.QUOTE_NONNUMERIC if has_cr else csv.QUOTE_MINIMAL
    with atomic_path(table_path) as tmp_table:
        df.to_csv(tmp_table, index=False, encoding="utf-8", lineterminator="\n", quoting=quoting)
        write_json(summary_path, summary)


def read_texts_table(path: str | os.PathLike) -> pd.DataFrame:
    """The caching job's input: ``prompt_id`` and ``text`` (``label`` and ``group`` where present),
    strings exactly as written (no NA coercion).

    Not :func:`read_prompt_table`: the workflow caches from prompt ids and texts alone (the texts
    file :func:`dry_run_check` writes; labels are joined when layers are extracted), so a relabel
    does not rerun the forward pass, and that reader requires the label and group columns."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read prompt table: {exc}", file=path) from exc
    missing = [c for c in ("prompt_id", "text") if c not in df.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}", file=path)
    return df


def read_prompt_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a prompt table written by :func:`write_prompt_table`.

    Every column is read as ``str`` with no NA coercion (``"NA"``, ``"None"``, ``"001"``
    stay as written), except ``source_line``/``scores_line`` which become int64. Raises
    :class:`InputError` when a core column is missing, a core value is empty, or a
    ``prompt_id`` repeats.
    """
    shown = os.fspath(path)
    text, _ = _read_text(Path(path), shown, "csv")
    columns, records = _parse_delimited(text, shown, ",")
    for col in CORE_COLUMNS:
        if col not in columns:
            raise InputError(
                f"required column is missing; columns found: {_short(columns, 50)}",
                file=shown,
                field=col,
            )
    seen: dict[str, int] = {}
    for rec in records:
        for col in CORE_COLUMNS:
            if rec.values[col] == "":
                raise InputError("empty value", file=shown, line=rec.line, field=col)
        pid = rec.values["prompt_id"]
        if pid in seen:
            raise InputError(
                f"duplicate prompt_id {pid!r} (first on line {seen[pid]}, again on line "
                f"{rec.line})",
                file=shown,
                line=rec.line,
                field="prompt_id",
            )
        seen[pid] = rec.line
    data: dict[str, Any] = {}
    for col in columns:
        values = [rec.values[col] for rec in records]
        if col in INT_COLUMNS:
            ints = []
            for rec, v in zip(records, values):
                try:
                    ints.append(int(v))
                except ValueError:
                    raise InputError(
                        f"value {v!r} is not an integer", file=shown, line=rec.line, field=col
                    ) from None
            data[col] = pd.Series(ints, dtype="int64")
        else:
            data[col] = pd.Series(values, dtype=str)
    return pd.DataFrame(data, columns=columns)


def read_records(path: str | os.PathLike) -> tuple[list[str], list[Any], str]:
    """``(columns, records, shown)`` of a CSV, TSV or JSONL file, each record with its 1-based
    ``line`` and its raw ``values`` (the one reader of the side inputs: patching pairs, steering
    prompts). Errors are :class:`InputError` naming the file and line."""
    shown = os.fspath(path)
    fmt = _format_of(shown, shown)
    text, _ = _read_text(Path(path), shown)
    if fmt == "jsonl":
        columns, records = _parse_jsonl(text, shown)
    else:
        columns, records = _parse_delimited(text, shown, "\t" if fmt == "tsv" else ",")
    return columns, records, shown
