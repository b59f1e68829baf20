"""Loader for generic interaction tables: CSV, TSV or Parquet with a column mapping.

The interactions table names a user, an item and (optionally) a time column. Separate item and user
tables in the same formats may add text attributes: each of their chosen text columns becomes one
attribute (by default every column other than the key). The format is told by the suffix: ``.csv``
(comma), ``.tsv`` / ``.tab`` (tab), ``.parquet`` / ``.pq``; any other suffix needs ``sep``. Text files
are UTF-8 with a header row; a one-character separator honours CSV quoting, a longer one (``"::"``)
splits plainly.

Timestamps are numbers (e.g. unix seconds) or ISO-8601 dates / date-times (``2014-03-01``,
``2014-03-01T10:00:00+01:00``, a trailing ``Z`` for UTC), which become unix seconds; a date-time
without a zone is read as UTC. Parquet timestamp columns are converted the same way.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from grasp.data.core import DataError, RawDataset
from grasp.data.loaders import _read_text

__all__ = ["load_table", "TABLE_SUFFIXES"]

#: Suffix -> separator of the formats told by their suffix (``None``: Parquet).
TABLE_SUFFIXES: dict[str, str | None] = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".parquet": None, ".pq": None}


@dataclass
class _Table:
    """A table's header and the rows of its needed columns; ``lines`` holds CSV line numbers, None for Parquet."""

    path: Path
    header: list[str]
    rows: list[list[object]]
    lines: list[int] | None

    def error(self, index: int, problem: str) -> DataError:
        if self.lines is None:
            return DataError(self.path, None, f"row {index + 1}: {problem}")
        return DataError(self.path, self.lines[index], problem)


def _check_header(path: Path, header: list[str], columns: list[str], line: int | None) -> None:
    duplicates = sorted({column for column in header if header.count(column) > 1})
    if duplicates:
        raise DataError(path, line, f"duplicate header column(s) {', '.join(duplicates)}")
    missing = [column for column in dict.fromkeys(columns) if column not in header]
    if missing:
        raise DataError(path, line, f"missing column(s) {', '.join(missing)} (header has {', '.join(header)})")


def _separator(path: Path, sep: str | None) -> str | None:
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES and TABLE_SUFFIXES[suffix] is None:
        return None
    if sep is not None:
        if not sep:
            raise ValueError("sep must not be empty")
        return sep
    if suffix not in TABLE_SUFFIXES:
        raise ValueError(
            f"cannot tell the format of {path} from its suffix {suffix!r}: pass sep= (known suffixes: "
            f"{', '.join(TABLE_SUFFIXES)})"
        )
    return TABLE_SUFFIXES[suffix]


def _wanted(header: list[str], columns: list[str] | None, key: str | None) -> list[str]:
    """``columns``, or when None, ``key`` followed by every other column of the header."""
    if columns is not None:
        return columns
    return [key] + [column for column in header if column != key] if key is not None else header


def _read(path: Path, sep: str | None, columns: list[str] | None, key: str | None = None) -> _Table:
    """The rows of ``columns`` (``key`` and all others when None) of a CSV / TSV / Parquet file."""
    sep = _separator(path, sep)
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    if sep is None:
        return _read_parquet(path, columns, key)
    text = _read_text(path, "utf-8")
    if len(sep) == 1:
        # Only \n, \r\n and \r end a record (str.splitlines would also split on \x0b, \x1c, \u2028, ...).
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
        records = ((reader.line_num, fields) for fields in reader)
    else:
        lines = text.replace("\r\n", "\n").split("\n")
        records = ((number, line.split(sep)) for number, line in enumerate(lines, 1))
    header_line, header = next(((n, f) for n, f in records if "".join(f).strip()), (None, None))
    if header is None:
        raise DataError(path, None, "file is empty")
    header = [column.strip() for column in header]
    wanted = _wanted(header, columns, key)
    _check_header(path, header, wanted, header_line)
    indices = [header.index(column) for column in wanted]
    table = _Table(path, wanted, [], [])
    for number, fields in records:
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) != len(header):
            raise DataError(path, number, f"expected {len(header)} {sep!r}-separated fields, got {len(fields)}")
        table.rows.append([fields[i] for i in indices])
        table.lines.append(number)
    if not table.rows:
        raise DataError(path, None, "no rows after the header")
    return table


def _read_parquet(path: Path, columns: list[str] | None, key: str | None) -> _Table:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    try:
        schema = pq.read_schema(path)
        header = list(schema.names)
        wanted = _wanted(header, columns, key)
        _check_header(path, header, wanted, None)
        data = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
    except DataError:
        raise
    except Exception as e:  # pyarrow raises its own error types for unreadable files
        raise DataError(path, None, f"cannot read Parquet file: {e}") from None
    if data.num_rows == 0:
        raise DataError(path, None, "no rows in the file")
    values = [data.column(column).to_pylist() for column in wanted]
    return _Table(path, wanted, [list(row) for row in zip(*values, strict=True)], None)


def _text(value: object) -> str:
    """A cell as stripped text; ``""`` for empty / null / NaN cells."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _seconds(value: object) -> float:
    """Unix seconds of a number, a datetime / date or an ISO-8601 string; ValueError when it is none of them."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    else:
        raise ValueError(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _attributes(path: Path, key: str, text: list[str] | None, sep: str | None) -> dict[str, dict[str, str]]:
    """Key -> {column: text} of an attribute table; empty cells are left out."""
    table = _read(path, sep, None if text is None else [key, *[c for c in text if c != key]], key)
    attributes: dict[str, dict[str, str]] = {}
    first: dict[str, int] = {}
    for index, row in enumerate(table.rows):
        token = _text(row[0])
        if not token:
            raise table.error(index, f"empty {key} value")
        if token in attributes:
            raise table.error(index, f"duplicate {key} {token!r} (first on {_where(table, first[token])})")
        first[token] = index
        attributes[token] = {column: _text(value) for column, value in zip(table.header[1:], row[1:], strict=True)
                             if _text(value)}  # fmt: skip
    return attributes


def _where(table: _Table, index: int) -> str:
    return f"row {index + 1}" if table.lines is None else f"line {table.lines[index]}"


def load_table(
    path: str | Path,
    *,
    user: str,
    item: str,
    time: str | None,
    sep: str | None = None,
    item_path: str | Path | None = None,
    item_key: str | None = None,
    item_text: list[str] | None = None,
    user_path: str | Path | None = None,
    user_key: str | None = None,
    user_text: list[str] | None = None,
    name: str | None = None,
    domain: str = "",
) -> RawDataset:
    """Load interactions from a CSV / TSV / Parquet table, with optional item and user attribute tables.

    Args:
        path: the interactions table.
        user, item: the user and item columns (values are read as text tokens).
        time: the time column (numbers or ISO-8601 dates, see the module docs); None keeps the file order.
        sep: field separator of text tables; by default from the suffix (``.csv`` comma, ``.tsv`` tab).
            Also used for the attribute tables that are text files.
        item_path: a table of item attributes; ``item_key`` names its item column (default: ``item``),
            ``item_text`` its text columns (default: every other column).
        user_path, user_key, user_text: the same for users.
        name: dataset name; the file name without its suffix by default.
        domain: what the items are, for prompts (e.g. ``"book"``).

    Raises:
        DataError: a missing or empty file, non-UTF-8 bytes, a duplicate or missing column, a row with the
            wrong number of fields, an empty user / item / key, a duplicate key in an attribute table or a
            timestamp that is neither a number nor an ISO-8601 date.
        ValueError: a suffix without a known format and no ``sep``.
        ImportError: a Parquet file without pyarrow installed.
    """
    path = Path(path)
    table = _read(path, sep, [user, item] + ([time] if time is not None else []))
    users, items, times = [], [], []
    for index, row in enumerate(table.rows):
        for column, value, tokens in ((user, row[0], users), (item, row[1], items)):
            token = _text(value)
            if not token:
                raise table.error(index, f"empty {column} value")
            tokens.append(token)
        if time is None:
            times.append(float(index))
            continue
        try:
            when = _seconds(row[2])
        except (ValueError, OverflowError, OSError):
            raise table.error(index, f"non-numeric {time} {row[2]!r} (not an ISO-8601 date either)") from None
        if not math.isfinite(when):
            raise table.error(index, f"{time} {row[2]!r} is not a finite number")
        times.append(when)
    item_attributes = {} if item_path is None else _attributes(Path(item_path), item_key or item, item_text, sep)
    user_attributes = {} if user_path is None else _attributes(Path(user_path), user_key or user, user_text, sep)
    return RawDataset(
        name=name or path.name.split(".")[0],
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.float64),
        item_attributes=item_attributes,
        user_attributes=user_attributes,
        domain=domain,
    )
