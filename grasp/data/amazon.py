"""Loader for the raw McAuley Amazon review dumps, 2014 and 2018 releases.

* Reviews: one JSON object per line (``reviews_<Category>[_5].json[.gz]`` in 2014,
  ``<Category>[_5].json[.gz]`` in 2018) with ``reviewerID``, ``asin`` and ``unixReviewTime``; other
  fields (rating, text, ``vote``, ``style``, ...) are ignored.
* Metadata: ``meta_<Category>.json[.gz]``, one product per line: Python literals in 2014 (read with
  :func:`ast.literal_eval`, which accepts literals only and never runs code), JSON in 2018.

Gzip is detected from the file's first bytes, not its name. Item text attributes are ``title``,
``brand``, ``price``, ``categories`` (2014 ``categories`` list of lists or 2018 ``category`` list:
flattened, de-duplicated, joined with ", "), ``features`` (2018 ``feature`` list) and ``description``
(2014 string, 2018 list of strings), with HTML tags and entities removed and whitespace collapsed;
empty or missing fields are left out. Only items that occur in the reviews are kept; a product listed
twice in the metadata (the 2018 dumps have such duplicates) keeps its first entry.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from grasp.data.core import DataError, RawDataset
from grasp.data.loaders import _timestamp

__all__ = ["load_amazon", "amazon_category"]

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_REQUIRED = ("reviewerID", "asin", "unixReviewTime")
#: Words that make a category name a list of things ("Toys and Games"); such names are not singularised.
_JOINERS = {"and", "for", "&", "of"}


def amazon_category(path: str | Path) -> str:
    """The category part of an Amazon dump's file name: ``reviews_Office_Products_5.json.gz`` -> ``Office_Products``.

    Strips ``.gz``, ``.json``, a ``reviews_`` / ``meta_`` prefix and a ``_5`` (5-core) suffix.
    """
    return _stem(path).removesuffix("_5")


def _stem(path: str | Path) -> str:
    """A dump's file name without ``.json[.gz]`` and ``reviews_`` / ``meta_``."""
    stem = Path(path).name
    for suffix in (".gz", ".json", ".jsonl"):
        stem = stem.removesuffix(suffix)
    for prefix in ("reviews_", "meta_"):
        stem = stem.removeprefix(prefix)
    return stem


def _domain(category: str) -> str:
    """A prompt domain from a category file name: ``Office_Products`` -> ``office product``."""
    words = category.replace("_", " ").lower().split()
    if words and not _JOINERS.intersection(words):
        last = words[-1]
        if last.endswith("ies") and len(last) > 4:
            words[-1] = last[:-3] + "y"
        elif last.endswith("s") and not last.endswith(("ss", "us", "is", "ics")):
            words[-1] = last[:-1]
    return " ".join(words)


def _json_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) of the non-blank lines of a plain or gzip-compressed UTF-8 file."""
    if not path.is_file():
        raise DataError(path, None, "file not found" if not path.exists() else "not a regular file")
    with path.open("rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    offset, number, seen = 0, 0, False
    try:
        with opener(path, "rb") as stream:
            for number, raw in enumerate(stream, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    at = offset + e.start
                    where = "uncompressed byte offset" if compressed else "byte offset"
                    raise DataError(
                        path, number, f"invalid utf-8 byte 0x{raw[e.start]:02x} at {where} {at} ({e.reason})"
                    ) from None
                offset += len(raw)
                if line.strip():
                    seen = True
                    yield number, line.strip().removeprefix("\ufeff")
    except (OSError, EOFError, zlib.error) as e:
        what = "gzip data" if compressed else "the file"
        raise DataError(path, number + 1 if number else None, f"cannot read {what}: {e}") from None
    if not seen:
        raise DataError(path, None, "file is empty")


def _record(path: Path, number: int, line: str) -> dict:
    """One line as a dict: JSON first, else a Python literal (2014 metadata); never evaluated as code."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(line)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise DataError(path, number, f"not a JSON object or Python dict literal: {shown!r}") from None
    if not isinstance(value, dict):
        raise DataError(path, number, f"expected an object, got {type(value).__name__}")
    return value


def _clean(value: object) -> str:
    """Text without HTML tags or entities, whitespace collapsed; ``""`` for anything that is not text."""
    if not isinstance(value, str):
        return ""
    return _SPACE.sub(" ", html.unescape(_TAG.sub(" ", value))).strip()


def _texts(value: object) -> list[str]:
    """The cleaned, non-empty strings of a string or an arbitrarily nested list of strings, in order."""
    if isinstance(value, (list, tuple)):
        return [text for element in value for text in _texts(element)]
    text = _clean(value)
    return [text] if text else []


def _price(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"${value:.2f}" if value >= 0 else ""
    text = _clean(value)
    # 2018 prices are strings like "$12.99" or "$5.00 - $9.00"; some are page fragments instead.
    return text if text and len(text) <= 40 and any(c.isdigit() for c in text) else ""


def _item_attributes(meta: dict) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for key in ("title", "brand"):
        text = _clean(meta.get(key))
        if text:
            attributes[key] = text
    price = _price(meta.get("price"))
    if price:
        attributes["price"] = price
    categories = list(dict.fromkeys(_texts(meta.get("categories")) + _texts(meta.get("category"))))
    if categories:
        attributes["categories"] = ", ".join(categories)
    features = list(dict.fromkeys(_texts(meta.get("feature"))))
    if features:
        attributes["features"] = "; ".join(features)
    description = " ".join(_texts(meta.get("description")))
    if description:
        attributes["description"] = description
    return attributes


def _token(path: Path, number: int, record: dict, key: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(path, number, f"{key} must be a non-empty string, got {value!r}")
    return str(value).strip()


def load_amazon(
    reviews: str | Path, meta: str | Path | None = None, *, name: str | None = None, domain: str | None = None
) -> RawDataset:
    """Load an Amazon review dump (2014 or 2018 release) and, optionally, its product metadata.

    Args:
        reviews: the reviews file (``.json`` or ``.json.gz``, one JSON object per line).
        meta: the ``meta_*.json[.gz]`` file of the same category; without it items have no text.
        name: dataset name; by default ``amazon-`` and the file's category, e.g. ``amazon-office-products-5``.
        domain: what the items are, for prompts; by default from the file name
            (``reviews_Office_Products_5.json.gz`` -> ``"office product"``).

    Returns:
        The interactions (user ``reviewerID``, item ``asin``, time ``unixReviewTime``) in file order, and
        the text attributes of the reviewed items; no user attributes.

    Raises:
        DataError: a missing or empty file, undecodable bytes, corrupt gzip data, a line that is not a JSON
            object (or, in metadata, a Python dict literal), a missing ``reviewerID`` / ``asin`` /
            ``unixReviewTime`` or a non-numeric time.
    """
    reviews = Path(reviews)
    category = amazon_category(reviews)
    users: list[str] = []
    items: list[str] = []
    times: list[float] = []
    for number, line in _json_lines(reviews):
        record = _record(reviews, number, line)
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise DataError(reviews, number, f"missing key(s) {', '.join(missing)}")
        users.append(_token(reviews, number, record, "reviewerID"))
        items.append(_token(reviews, number, record, "asin"))
        when = record["unixReviewTime"]
        if isinstance(when, bool) or not isinstance(when, (int, float, str)):
            raise DataError(reviews, number, f"non-numeric unixReviewTime {when!r}")
        times.append(_timestamp(reviews, number, str(when).strip(), "unixReviewTime"))

    item_attributes: dict[str, dict[str, str]] = {}
    if meta is not None:
        meta = Path(meta)
        wanted = set(items)
        for number, line in _json_lines(meta):
            record = _record(meta, number, line)
            if "asin" not in record:
                raise DataError(meta, number, "missing key asin")
            asin = _token(meta, number, record, "asin")
            if asin in wanted and asin not in item_attributes:
                item_attributes[asin] = _item_attributes(record)
    return RawDataset(
        name=name or "amazon-" + _stem(reviews).lower().replace("_", "-"),
        users=np.array(users, dtype=object),
        items=np.array(items, dtype=object),
        timestamps=np.array(times, dtype=np.float64),
        item_attributes=item_attributes,
        user_attributes={},
        domain=_domain(category) if domain is None else domain,
    )
