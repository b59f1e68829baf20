"""Dataset loaders: raw interaction logs and text attributes in one in-memory form.

Every loader returns a :class:`RawDataset`: the interactions as three parallel numpy arrays
(user token, item token, timestamp) in file order, plus the text attributes of items and users
keyed by their original tokens. Preprocessing (:mod:`grasp.data.preprocess`) turns it into the
remapped, split :class:`~grasp.data.preprocess.Dataset` that the later stages read.

Supported layouts:

* MovieLens raw: ml-100k (``u.data``, ``u.item`` in latin-1, ``u.user``), ml-1m and ml-10m
  (``ratings.dat``, ``movies.dat``, ``users.dat`` when present, ``::`` separated) and ml-20m / ml-25m
  (``ratings.csv``, ``movies.csv``), told apart by the files present (:func:`load_movielens`).
* RecBole atomic files: ``<name>.inter``, optional ``<name>.item`` and ``<name>.user``, tab-separated
  with ``field:type`` headers (:func:`load_recbole`).

Bad input raises :class:`DataError`, whose message starts with ``file:line:`` and names the problem.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from grasp.data.core import DataError, RawDataset

__all__ = ["load_movielens", "load_recbole", "RECBOLE_TYPES"]

#: Field types of RecBole atomic file headers (``name:type``).
RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
#: The text-like RecBole types: their columns in ``.item`` / ``.user`` become attributes.
_TEXT_TYPES = ("token", "token_seq")

#: ml-100k genre names in flag order, used when ``u.genre`` is absent.
_ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
#: ml-1m ``users.dat`` age codes and occupation codes (from the ml-1m README).
_ML1M_AGES = {
    "1": "under 18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+",
}  # fmt: skip
_ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
)  # fmt: skip
_TITLE_YEAR = re.compile(r"^(.*?)\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


# ----------------------------------------------------------------------------------------------- reading


def _read_text(path: Path, encoding: str) -> str:
    """The whole file decoded; missing files, undecodable bytes and empty files raise DataError."""
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            path, line, f"invalid {encoding} byte 0x{data[e.start]:02x} at byte offset {e.start} ({e.reason})"
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text.strip():
        raise DataError(path, None, "file is empty")
    return text


def _lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for the non-blank lines of a file."""
    for number, line in enumerate(_read_text(path, encoding).splitlines(), 1):
        if line.strip():
            yield number, line.rstrip("\r")


def _split(path: Path, number: int, line: str, sep: str, min_fields: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) < min_fields:
        raise DataError(path, number, f"expected at least {min_fields} {sep!r}-separated fields, got {len(fields)}")
    return fields


def _timestamp(path: Path, number: int, text: str, column: str = "timestamp") -> float:
    try:
        value = float(text)
    except ValueError:
        raise DataError(path, number, f"non-numeric {column} {text!r}") from None
    if not math.isfinite(value):
        raise DataError(path, number, f"{column} {text!r} is not a finite number")
    return value


def _raw(
    name: str, rows: list[tuple[str, str, float]], path: Path, item_attributes, user_attributes, domain: str = ""
) -> RawDataset:
    if not rows:
        raise DataError(path, None, "no interactions in the file")
    users, items, times = zip(*rows, strict=True)
    return RawDataset(
        name=name,
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.float64),
        item_attributes=item_attributes,
        user_attributes=user_attributes,
        domain=domain,
    )


def _title_year(title: str) -> dict[str, str]:
    """{"title": ..., "year": ...} from a MovieLens "Title (Year)" string (year left out when absent)."""
    title = title.strip()
    match = _TITLE_YEAR.match(title)
    if match and match.group(1):
        return {"title": match.group(1), "year": match.group(2)}
    return {"title": title} if title else {}


# ----------------------------------------------------------------------------------------------- MovieLens


def load_movielens(path: str | Path, name: str | None = None) -> RawDataset:
    """Load a raw GroupLens MovieLens folder, telling the layout from the files present.

    * ``u.data`` (ml-100k): ``u.data`` (user, item, rating, timestamp; tab-separated), ``u.item``
      (latin-1, ``|``-separated: title, release date, genre flags named by ``u.genre`` when present)
      and ``u.user`` when present (age, gender, occupation).
    * ``ratings.dat`` (ml-1m, ml-10m): ``::``-separated ``ratings.dat``, ``movies.dat`` (title with the
      year in parentheses, ``|``-separated genres) and ``users.dat`` when present.
    * ``ratings.csv`` (ml-20m, ml-25m): ``ratings.csv`` and ``movies.csv`` with header rows.

    Ratings are ignored (every rating is an interaction). Item attributes are ``title``, ``year``,
    ``genres`` (comma-separated) and, for ml-100k, ``release_date``; user attributes are ``age``,
    ``gender`` and ``occupation``.

    Args:
        path: the folder holding the files.
        name: dataset name; the folder name by default.

    Raises:
        DataError: no known layout in the folder, or a file is missing, empty, undecodable or malformed.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, None, "MovieLens folder not found" if not path.exists() else "not a folder")
    name = name or path.resolve().name
    if (path / "u.data").exists():
        return _load_ml100k(path, name)
    if (path / "ratings.dat").exists():
        return _load_ml_dat(path, name)
    if (path / "ratings.csv").exists():
        return _load_ml_csv(path, name)
    raise DataError(
        path, None, "no MovieLens layout found: expected u.data (ml-100k), ratings.dat (ml-1m/10m) or ratings.csv"
    )


def _ratings(path: Path, sep: str, encoding: str = "utf-8") -> list[tuple[str, str, float]]:
    rows = []
    for number, line in _lines(path, encoding):
        fields = _split(path, number, line, sep, 4)
        rows.append((fields[0].strip(), fields[1].strip(), _timestamp(path, number, fields[3].strip())))
    return rows


def _load_ml100k(path: Path, name: str) -> RawDataset:
    rows = _ratings(path / "u.data", "\t")
    genres = list(_ML100K_GENRES)
    if (path / "u.genre").exists():
        genres = []
        for number, line in _lines(path / "u.genre", "latin-1"):
            genre, index = _split(path / "u.genre", number, line, "|", 2)[:2]
            if index.strip() != str(len(genres)):
                raise DataError(path / "u.genre", number, f"expected genre index {len(genres)}, got {index!r}")
            genres.append(genre)
    item_file = path / "u.item"
    items: dict[str, dict[str, str]] = {}
    for number, line in _lines(item_file, "latin-1"):
        fields = _split(item_file, number, line, "|", 5 + len(genres))
        flags = fields[5 : 5 + len(genres)]
        if any(flag not in ("0", "1") for flag in flags):
            raise DataError(item_file, number, f"genre flags must be 0 or 1, got {'|'.join(flags)!r}")
        attributes = _title_year(fields[1])
        if fields[2].strip():
            attributes["release_date"] = fields[2].strip()
        named = [genre for genre, flag in zip(genres, flags, strict=True) if flag == "1" and genre != "unknown"]
        if named:
            attributes["genres"] = ", ".join(named)
        items[fields[0].strip()] = attributes
    users: dict[str, dict[str, str]] = {}
    user_file = path / "u.user"
    if user_file.exists():
        for number, line in _lines(user_file, "latin-1"):
            fields = _split(user_file, number, line, "|", 4)
            users[fields[0].strip()] = {"age": fields[1].strip(), "gender": fields[2].strip(),
                                        "occupation": fields[3].strip()}  # fmt: skip
    return _raw(name, rows, path / "u.data", items, users, "movie")


def _dat_encoding(path: Path) -> str:
    """ml-1m's .dat files are latin-1, later releases UTF-8: UTF-8 when it decodes, else latin-1."""
    try:
        path.read_bytes().decode("utf-8")
        return "utf-8"
    except (UnicodeDecodeError, OSError):
        return "latin-1"


def _movie(title: str, genres: str) -> dict[str, str]:
    attributes = _title_year(title)
    named = [g.strip() for g in genres.split("|") if g.strip() and g.strip() != "(no genres listed)"]
    if named:
        attributes["genres"] = ", ".join(named)
    return attributes


def _load_ml_dat(path: Path, name: str) -> RawDataset:
    rows = _ratings(path / "ratings.dat", "::")
    movie_file = path / "movies.dat"
    items: dict[str, dict[str, str]] = {}
    for number, line in _lines(movie_file, _dat_encoding(movie_file)):
        fields = _split(movie_file, number, line, "::", 3)
        # A title may itself hold "::"; the id is first and the genres last.
        items[fields[0].strip()] = _movie("::".join(fields[1:-1]), fields[-1])
    users: dict[str, dict[str, str]] = {}
    user_file = path / "users.dat"
    if user_file.exists():
        for number, line in _lines(user_file, _dat_encoding(user_file)):
            user, gender, age, occupation = _split(user_file, number, line, "::", 4)[:4]
            occupation = occupation.strip()
            if occupation.isdigit() and int(occupation) < len(_ML1M_OCCUPATIONS):
                occupation = _ML1M_OCCUPATIONS[int(occupation)]
            users[user.strip()] = {"age": _ML1M_AGES.get(age.strip(), age.strip()), "gender": gender.strip(),
                                   "occupation": occupation}  # fmt: skip
    return _raw(name, rows, path / "ratings.dat", items, users, "movie")


def _csv_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a csv file with a header row holding the ``required`` columns."""
    text = _read_text(path, "utf-8")
    reader = csv.reader(text.splitlines())
    header = next(reader)
    header = [column.strip() for column in header]
    duplicates = sorted({column for column in header if header.count(column) > 1})
    if duplicates:
        raise DataError(path, 1, f"duplicate header column(s) {', '.join(duplicates)}")
    missing = [column for column in required if column not in header]
    if missing:
        raise DataError(path, 1, f"missing column(s) {', '.join(missing)} (header has {', '.join(header)})")
    for fields in reader:
        if not fields or not "".join(fields).strip():
            continue
        if len(fields) != len(header):
            raise DataError(path, reader.line_num, f"expected {len(header)} fields, got {len(fields)}")
        yield reader.line_num, dict(zip(header, fields, strict=True))


def _load_ml_csv(path: Path, name: str) -> RawDataset:
    ratings = path / "ratings.csv"
    rows = [
        (row["userId"].strip(), row["movieId"].strip(), _timestamp(ratings, number, row["timestamp"].strip()))
        for number, row in _csv_rows(ratings, ("userId", "movieId", "timestamp"))
    ]
    items = {
        row["movieId"].strip(): _movie(row["title"], row["genres"])
        for _, row in _csv_rows(path / "movies.csv", ("movieId", "title", "genres"))
    }
    return _raw(name, rows, ratings, items, {}, "movie")


# ----------------------------------------------------------------------------------------------- RecBole


def _atomic(path: Path) -> tuple[list[tuple[str, str]], Iterator[tuple[int, list[str]]]]:
    """The ``(field, type)`` header of a RecBole atomic file and an iterator over its data rows."""
    lines = _lines(path, "utf-8")
    number, header_line = next(lines)
    header: list[tuple[str, str]] = []
    for column in header_line.split("\t"):
        field_name, colon, kind = column.strip().rpartition(":")
        if not colon or not field_name:
            raise DataError(path, number, f"header column {column!r} is not of the form name:type")
        if kind not in RECBOLE_TYPES:
            raise DataError(
                path, number, f"unknown field type {kind!r} in {column!r} (known: {', '.join(RECBOLE_TYPES)})"
            )
        if any(field_name == seen for seen, _ in header):
            raise DataError(path, number, f"duplicate header column {field_name!r}")
        header.append((field_name, kind))

    def rows() -> Iterator[tuple[int, list[str]]]:
        for number, line in lines:
            fields = line.split("\t")
            if len(fields) != len(header):
                raise DataError(path, number, f"expected {len(header)} tab-separated fields, got {len(fields)}")
            yield number, fields

    return header, rows()


def _column(path: Path, header: list[tuple[str, str]], field_name: str) -> int:
    names = [name for name, _ in header]
    if field_name not in names:
        raise DataError(path, 1, f"missing column {field_name!r} (header has {', '.join(names)})")
    return names.index(field_name)


def _attributes(path: Path, key: str) -> dict[str, dict[str, str]]:
    header, rows = _atomic(path)
    key_index = _column(path, header, key)
    text_columns = [(i, name) for i, (name, kind) in enumerate(header) if kind in _TEXT_TYPES and i != key_index]
    table: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for number, fields in rows:
        token = fields[key_index].strip()
        if token in table:
            raise DataError(path, number, f"duplicate {key} {token!r} (first on line {first_line[token]})")
        first_line[token] = number
        table[token] = {name: fields[i].strip() for i, name in text_columns if fields[i].strip()}
    return table


def load_recbole(path: str | Path, name: str | None = None) -> RawDataset:
    """Load RecBole atomic files ``<name>.inter`` and, when present, ``<name>.item`` and ``<name>.user``.

    The files are UTF-8 and tab-separated, with a header row of ``field:type`` columns, where type is one
    of :data:`RECBOLE_TYPES`. ``.inter`` needs ``user_id`` and ``item_id`` columns; its ``timestamp``
    column, when present, orders each user's history (without it, the file order does). Every token and
    token_seq column of ``.item`` (keyed by ``item_id``) and ``.user`` (keyed by ``user_id``) becomes a
    text attribute; empty values are left out.

    Args:
        path: the folder holding the files.
        name: the files' base name; the folder name by default.

    Raises:
        DataError: a missing ``.inter`` file or column, an empty file, non-UTF-8 bytes, an unknown field
            type, a duplicate header column or key, a wrong field count or a non-numeric timestamp.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(path, None, "RecBole folder not found" if not path.exists() else "not a folder")
    name = name or path.resolve().name
    inter = path / f"{name}.inter"
    header, rows = _atomic(inter)
    user_index = _column(inter, header, "user_id")
    item_index = _column(inter, header, "item_id")
    names = [column for column, _ in header]
    time_index = names.index("timestamp") if "timestamp" in names else None
    if time_index is not None and header[time_index][1] != "float":
        raise DataError(inter, 1, f"timestamp column must have type float, got {header[time_index][1]!r}")
    interactions = []
    for position, (number, fields) in enumerate(rows):
        when = float(position) if time_index is None else _timestamp(inter, number, fields[time_index].strip())
        interactions.append((fields[user_index].strip(), fields[item_index].strip(), when))
    item_file, user_file = path / f"{name}.item", path / f"{name}.user"
    items = _attributes(item_file, "item_id") if item_file.exists() else {}
    users = _attributes(user_file, "user_id") if user_file.exists() else {}
    return _raw(name, interactions, inter, items, users)
