"""The shared cache: the embeddings and LLM answers of every run in one SQLite file (docs/design.md section 1).

One file, ``$GRASP_CACHE/cache.sqlite3``, holds two tables: ``namespaces`` (a kind such as ``"embedding"``
or ``"chat"`` and a label naming everything that changes the values: encoder or generator, model, server,
sampling settings) and ``entries`` (namespace, sha256 of the text, value). Values are the UTF-8 answer of
an LLM or the little-endian float32 bytes of an embedding.

SQLite makes it robust: every write is one transaction (write-ahead log), so a killed run loses only the
batch it was writing and never leaves a half-written entry, and concurrent runs wait for each other's
writes instead of mixing them. A file that is not a database or is damaged (e.g. truncated) is deleted and
started afresh with a one-line warning; any other SQLite failure (a full disk, a lock held too long)
turns the cache off for the rest of the run with a warning. Neither stops a run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

__all__ = ["CACHE_FILE", "EMBEDDING", "NamespaceInfo", "SharedCache", "cache_dir", "open_shared_cache"]

log = logging.getLogger(__name__)

#: The file inside the cache folder.
CACHE_FILE = "cache.sqlite3"
#: The namespace kind of embeddings; every other kind holds LLM answers.
EMBEDDING = "embedding"
#: How long a write waits for another process's write to finish before giving up on the cache.
_BUSY_SECONDS = 120.0
#: Keys per SELECT (well under SQLite's limit on bound parameters).
_CHUNK = 500
#: SQLite's primary result codes for a damaged file (SQLITE_CORRUPT) and for a file that is not a database
#: (SQLITE_NOTADB).
_CORRUPT_CODES = (11, 26)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so a stale id can never name another namespace
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    UNIQUE (kind, label)
);
CREATE TABLE IF NOT EXISTS entries (
    namespace INTEGER NOT NULL,
    key BLOB NOT NULL,  -- sha256 of the text
    value BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
);
"""

Value = str | bytes
T = TypeVar("T")


def cache_dir() -> Path:
    """The cache folder: ``$GRASP_CACHE`` when set (and not ``off``), else ``$XDG_CACHE_HOME/grasp``, else
    ``~/.cache/grasp``. It also holds the dataset downloads (:mod:`grasp.data.download`)."""
    value = os.environ.get("GRASP_CACHE", "")
    if value and not _is_off(value):
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "grasp"


def _is_off(value: str) -> bool:
    return value.strip().lower() == "off"


def open_shared_cache() -> SharedCache | None:
    """The shared cache in :func:`cache_dir`, or None when ``GRASP_CACHE=off`` (nothing is opened yet)."""
    if _is_off(os.environ.get("GRASP_CACHE", "")):
        return None
    return SharedCache(cache_dir() / CACHE_FILE)


def _redact(label: str) -> str:
    """The label without credentials written into a URL (``scheme://user:secret@host``)."""
    return re.sub(r"(://)[^/@\s\"']*@", r"\1***@", label)


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _is_corrupt(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    return type(error) is sqlite3.DatabaseError  # what SQLite raises for both on older Pythons


@dataclass(frozen=True)
class NamespaceInfo:
    """One namespace of the cache: its kind, label, number of entries and their size in bytes."""

    kind: str
    label: str
    entries: int
    bytes: int


def _when_unlocked(statement: Callable[[], T]) -> T:
    """Run ``statement``, retrying while another process holds the lock it needs (up to ``_BUSY_SECONDS``).

    SQLite's busy timeout covers transactions but not switching a new file to WAL mode, which fails at once
    with "database is locked" while a concurrent process is setting up the same file.
    """
    deadline = time.monotonic() + _BUSY_SECONDS
    while True:
        try:
            return statement()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
        time.sleep(random.uniform(0.005, 0.05))


class SharedCache:
    """Values keyed by ``(kind, label, text)`` in a SQLite file, safe for threads and concurrent processes.

    The file (and its folder) is created on the first write. Use as a context manager or call :meth:`close`.

    Args:
        path: the SQLite file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._disabled = False

    def __repr__(self) -> str:
        return f"SharedCache({str(self.path)!r})"

    # ------------------------------------------------------------------------------------ connection

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun and committed explicitly below.
            connection = sqlite3.connect(self.path, timeout=_BUSY_SECONDS, isolation_level=None,
                                         check_same_thread=False)  # fmt: skip
            try:
                _when_unlocked(lambda: connection.execute("PRAGMA journal_mode=WAL"))  # readers never block writers
                connection.execute("PRAGMA synchronous=NORMAL")  # a crash of the process loses no commit
                _when_unlocked(lambda: connection.executescript(_SCHEMA))
            except BaseException:
                connection.close()
                raise
            self._connection = connection
        return self._connection

    def _reset(self) -> None:
        """Delete a damaged file (with its write-ahead log) so that the next use starts an empty one."""
        self.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _guard(self, operation: Callable[[sqlite3.Connection], T], default: T) -> T:
        """Run ``operation`` on the connection; a damaged file is started afresh and the operation retried
        once, any other SQLite failure turns the cache off. Either way a warning says so and ``default``
        (or the retried result) comes back instead of an exception."""
        with self._lock:
            if self._disabled:
                return default
            try:
                return operation(self._connect())
            except (sqlite3.Error, OSError) as error:  # OSError: the folder cannot be made
                if not (isinstance(error, sqlite3.Error) and _is_corrupt(error)):
                    return self._disable(error, default)
                log.warning("shared cache %s is damaged (%s): starting an empty one", self.path, error)
            try:
                self._reset()
                return operation(self._connect())
            except (sqlite3.Error, OSError) as error:
                return self._disable(error, default)

    def _disable(self, error: Exception, default: T) -> T:
        log.warning("shared cache %s is unavailable (%s): continuing without it", self.path, error)
        self.close()
        self._disabled = True
        return default

    @staticmethod
    def _write(connection: sqlite3.Connection, statements: Callable[[], T]) -> T:
        """Run ``statements`` in one immediate transaction: all of it is stored, or (on any error) none."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = statements()
            connection.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        return result

    @staticmethod
    def _namespace(connection: sqlite3.Connection, kind: str, label: str, create: bool) -> int | None:
        """The namespace's id, looked up in every call (another process may have cleared it meanwhile)."""
        if create:
            connection.execute("INSERT OR IGNORE INTO namespaces (kind, label) VALUES (?, ?)", (kind, label))
        row = connection.execute("SELECT id FROM namespaces WHERE kind = ? AND label = ?", (kind, label)).fetchone()
        return None if row is None else int(row[0])

    # --------------------------------------------------------------------------------------- entries

    def get_many(self, kind: str, label: str, texts: Iterable[str]) -> dict[str, Value]:
        """The stored values of those ``texts`` that have one (text -> value); nothing for a missing file."""
        by_key = {_digest(text): text for text in texts}
        if not by_key or not self.path.exists():
            return {}
        label = _redact(label)

        def read(connection: sqlite3.Connection) -> dict[str, Value]:
            namespace = self._namespace(connection, kind, label, create=False)
            if namespace is None:
                return {}
            found: dict[str, Value] = {}
            keys = list(by_key)
            for start in range(0, len(keys), _CHUNK):
                part = keys[start : start + _CHUNK]
                rows = connection.execute(
                    f"SELECT key, value FROM entries WHERE namespace = ? AND key IN ({', '.join('?' * len(part))})",
                    (namespace, *part),
                )
                found.update((by_key[key], value) for key, value in rows)
            return found

        return self._guard(read, {})

    def put_many(self, kind: str, label: str, items: Iterable[tuple[str, Value]]) -> None:
        """Store ``(text, value)`` pairs in one transaction; texts already stored keep their value."""
        rows = [(_digest(text), value) for text, value in items]
        if not rows:
            return
        label = _redact(label)

        def write(connection: sqlite3.Connection) -> None:
            def statements() -> None:
                namespace = self._namespace(connection, kind, label, create=True)
                connection.executemany("INSERT OR IGNORE INTO entries (namespace, key, value) VALUES (?, ?, ?)",
                                       [(namespace, key, value) for key, value in rows])  # fmt: skip

            self._write(connection, statements)

        self._guard(write, None)

    # ----------------------------------------------------------------------------------- maintenance

    def size(self) -> int:
        """Bytes on disk: the database with its write-ahead log."""
        return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.is_file())

    def namespaces(self) -> list[NamespaceInfo]:
        """Every namespace with its number of entries and their bytes, by kind and label."""
        if not self.path.exists():
            return []

        def read(connection: sqlite3.Connection) -> list[NamespaceInfo]:
            rows = connection.execute(
                "SELECT n.kind, n.label, count(e.key), coalesce(sum(length(CAST(e.value AS BLOB))), 0) "
                "FROM namespaces n LEFT JOIN entries e ON e.namespace = n.id GROUP BY n.id ORDER BY n.kind, n.label"
            )
            return [NamespaceInfo(*row) for row in rows]

        return self._guard(read, [])

    def clear(self, which: str = "all") -> int:
        """Delete the entries of ``which`` (``"all"``, ``"embeddings"`` or ``"generations"``), give the space
        back to the file system, and return how many entries went."""
        if which not in ("all", "embeddings", "generations"):
            raise ValueError(f"which must be 'all', 'embeddings' or 'generations', got {which!r}")
        if not self.path.exists():
            return 0
        where = {"all": "1", "embeddings": "kind = ?", "generations": "kind != ?"}[which]
        parameters = () if which == "all" else (EMBEDDING,)

        def delete(connection: sqlite3.Connection) -> int:
            def statements() -> int:
                removed = connection.execute(
                    f"DELETE FROM entries WHERE namespace IN (SELECT id FROM namespaces WHERE {where})", parameters
                ).rowcount
                connection.execute(f"DELETE FROM namespaces WHERE {where}", parameters)
                # entries left by a run that wrote into a namespace cleared meanwhile
                connection.execute("DELETE FROM entries WHERE namespace NOT IN (SELECT id FROM namespaces)")
                return removed

            removed = self._write(connection, statements)
            try:  # give the space back; needs a moment when no other run is using the file
                connection.execute("VACUUM")
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as error:
                log.warning("shared cache %s: entries deleted, but the file was not compacted (%s)", self.path, error)
            return removed

        return self._guard(delete, 0)

    def close(self) -> None:
        """Close the connection (the next use opens it again)."""
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def __enter__(self) -> SharedCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
