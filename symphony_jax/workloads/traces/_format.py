"""Reading and validating trace files: JSON lines and CSV, column by column.

Every loader reads all records first, then converts and checks one column at a time with
numpy. A check that fails is traced back to the first offending record, and the error names
the file, the 1-based line and the field, what was expected and what was found. Nothing is
skipped except empty lines (which carry no record); a file with no record is an error.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

_MISSING = object()


class TraceFormatError(ValueError):
    """A trace file that does not follow its format."""

    def __init__(self, path: str | os.PathLike, line: int, field: str, expected: str, got: Any):
        self.path, self.line, self.field = str(path), line, field
        shown = repr(got) if len(repr(got)) <= 80 else repr(got)[:77] + "..."
        super().__init__(f"{self.path}:{line}: field {field!r}: expected {expected}, got {shown}")


def read_jsonl(path: str | os.PathLike) -> tuple[np.ndarray, list[dict]]:
    """Line numbers (i64[N], 1-based) and objects of a JSON-lines file."""
    lines, records = [], []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceFormatError(path, number, "<record>", f"a JSON object ({e.msg})",
                                       text.strip()) from None
            if not isinstance(record, dict):
                raise TraceFormatError(path, number, "<record>", "a JSON object", record)
            lines.append(number)
            records.append(record)
    if not records:
        raise TraceFormatError(path, 1, "<record>", "at least one record", "an empty file")
    return np.asarray(lines, np.int64), records


def read_csv(path: str | os.PathLike, required: Sequence[str],
             optional: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Line numbers (i64[N]) and the named columns (as strings) of a CSV file with a header.

    ``required`` columns must be in the header (any order); ``optional`` ones are returned
    when present. Every row must have as many fields as the header.
    """
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(path, 1, "<header>", f"a header with {list(required)}",
                                   "an empty file")
        header = [name.strip() for name in header]
        for name in required:
            if name not in header:
                raise TraceFormatError(path, 1, name, f"a column named {name!r}", header)
        wanted = [n for n in (*required, *optional) if n in header]
        index = {n: header.index(n) for n in wanted}
        columns: dict[str, list[str]] = {n: [] for n in wanted}
        lines = []
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise TraceFormatError(path, reader.line_num, "<row>",
                                       f"{len(header)} fields ({','.join(header)})", row)
            lines.append(reader.line_num)
            for name, i in index.items():
                columns[name].append(row[i])
    if not lines:
        raise TraceFormatError(path, 2, "<row>", "at least one row", "no rows")
    return np.asarray(lines, np.int64), columns


def json_field(path, lines: np.ndarray, records: list[dict], field: str) -> list:
    """The values of ``field`` in every record; missing in any record is an error."""
    values = [r.get(field, _MISSING) for r in records]
    _first_failure(path, lines, field, values, lambda v: v is not _MISSING,
                   "a value (missing field)")
    return values


def json_ints(path, lines: np.ndarray, values: list, field: str, minimum: int = 0) -> np.ndarray:
    """i64 column of JSON integers (not floats, not strings, not booleans), >= ``minimum``."""
    _first_failure(path, lines, field, values, lambda v: type(v) is int, "an integer")
    return _in_range(path, lines, field, np.asarray(values, np.int64), values, minimum)


def json_numbers(path, lines: np.ndarray, values: list, field: str, minimum: float = 0.0, *,
                 numeric_strings: bool = False) -> np.ndarray:
    """f64 column of JSON numbers (or strings holding one, if allowed), finite, >= minimum."""
    if numeric_strings:
        return strings_to_numbers(path, lines, [str(v) if type(v) in (int, float) else v
                                                for v in values], field, minimum=minimum)
    _first_failure(path, lines, field, values, lambda v: type(v) in (int, float), "a number")
    return _in_range(path, lines, field, np.asarray(values, np.float64), values, minimum)


def strings_to_numbers(path, lines: np.ndarray, values: Sequence, field: str, *,
                       integer: bool = False, minimum: float | None = 0.0,
                       blank_is_nan: bool = False) -> np.ndarray:
    """f64 (or i64 if ``integer``) column parsed from strings; blanks become NaN if allowed."""
    expected = "an integer" if integer else "a number"
    _first_failure(path, lines, field, values, lambda v: isinstance(v, str), expected)
    text = [v.strip() for v in values]
    blank = np.fromiter((v == "" for v in text), bool, len(text)) & blank_is_nan
    if blank.any():
        text = ["nan" if b else v for v, b in zip(text, blank)]
    try:
        numbers = np.asarray(text, dtype=np.float64)
    except ValueError:
        _first_failure(path, lines, field, text, _parses_as_float, expected)
        raise
    if integer:
        raise_at(path, lines, field, np.isfinite(numbers) & (numbers != np.round(numbers)),
                  values, expected)
    numbers = _in_range(path, lines, field, numbers, values, minimum, allow_nan=blank)
    return numbers.astype(np.int64) if integer else numbers


def _parses_as_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _first_failure(path, lines: np.ndarray, field: str, values: Sequence,
                   ok: Callable[[Any], bool], expected: str) -> None:
    for i, value in enumerate(values):
        if not ok(value):
            raise TraceFormatError(path, int(lines[i]), field, expected,
                                   None if value is _MISSING else value)


def raise_at(path, lines: np.ndarray, field: str, bad: np.ndarray, values: Sequence,
             expected: str) -> None:
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise TraceFormatError(path, int(lines[i]), field, expected, values[i])


def _in_range(path, lines: np.ndarray, field: str, numbers: np.ndarray, values: Sequence,
              minimum: float | None, allow_nan: np.ndarray | bool = False) -> np.ndarray:
    """``numbers`` if each is finite (or an allowed NaN) and >= ``minimum``."""
    if np.issubdtype(numbers.dtype, np.floating):
        raise_at(path, lines, field, ~np.isfinite(numbers) & ~allow_nan, values,
                  "a finite number")
    if minimum is not None:
        raise_at(path, lines, field, numbers < minimum, values, f"a value >= {minimum}")
    return numbers
