"""A crash-safe on-disk cache of LLM responses and embeddings, so that a killed run resumes where it stopped.

The cache is a JSON-lines file. Each line is one complete entry, ``{"key": ..., "kind": ..., "value": ...}``,
written with a single ``write`` followed by flush and ``fsync``. The key is the sha256 of ``(kind, model,
prompt)``; ``model`` stands for everything that changes the answer (model name, system prompt, temperature,
...). A text value is stored as a JSON string, a vector as ``{"f32": <base64 of float32 bytes>}``.

A process killed mid-write can leave a truncated last line: loading ignores it and cuts it off the file.
Any other bad line is an error naming the file and line.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from grasp.data.core import DataError

__all__ = ["ResponseCache", "ResponseStore", "cache_key"]

log = logging.getLogger(__name__)

Value = str | np.ndarray


def cache_key(kind: str, model: str, prompt: str) -> str:
    """The sha256 hex digest identifying ``(kind, model, prompt)``."""
    return hashlib.sha256(json.dumps([kind, model, prompt], ensure_ascii=False).encode("utf-8")).hexdigest()


def _encode(value: Value) -> object:
    if isinstance(value, str):
        return value
    vector = np.ascontiguousarray(value, dtype=np.float32)
    if vector.ndim != 1:
        raise ValueError(f"value must be a string or a 1-d vector, got an array of shape {vector.shape}")
    return {"f32": base64.b64encode(vector.tobytes()).decode("ascii")}


def _decode(value: object) -> Value:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("f32"), str):
        return np.frombuffer(base64.b64decode(value["f32"], validate=True), dtype=np.float32).copy()
    raise ValueError(f"unexpected value {str(value)[:60]!r}")


class ResponseStore(Protocol):
    """What the generators need of a cache: :class:`ResponseCache`, or the shared cache's
    :class:`~grasp.cache.SharedResponses`."""

    def get(self, kind: str, model: str, prompt: str) -> Value | None:
        """The stored value for ``(kind, model, prompt)``, or None."""

    def put(self, kind: str, model: str, prompt: str, value: str) -> None:
        """Store one text durably before returning."""

    def close(self) -> None:
        """Release the file."""


class ResponseCache:
    """Responses (text) and embeddings (float32 vectors) on disk, keyed by ``(kind, model, prompt)``.

    Thread-safe: several threads may call :meth:`put` at once. Use as a context manager or call
    :meth:`close` to release the file handle (it is reopened on the next write).

    Args:
        path: the JSON-lines file; created (with its folder) on the first write.

    Raises:
        DataError: a line other than the last is not a valid entry.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._entries: dict[str, Value] = {}
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path.exists():
            self._load()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r}, entries={len(self)})"

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        end = 0  # bytes of complete, valid lines
        for number, line in enumerate(lines, start=1):
            if number == len(lines):  # not followed by a newline: a write that did not complete
                if line.strip():
                    log.warning("%s:%d: dropping a truncated last cache line (from a killed run?)", self.path, number)
                break
            if line.strip():
                try:
                    entry = json.loads(line.decode("utf-8"))
                    self._entries[entry["key"]] = _decode(entry["value"])
                except (ValueError, KeyError, TypeError) as error:
                    raise DataError(self.path, number, f"corrupt cache entry ({error}); delete the line") from error
            end += len(line) + 1
        if end < len(data):
            os.truncate(self.path, end)

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, kind: str, model: str, prompt: str) -> bool:
        """Whether an entry exists for ``(kind, model, prompt)``."""
        return cache_key(kind, model, prompt) in self._entries

    def get(self, kind: str, model: str, prompt: str) -> Value | None:
        """The stored text or vector for ``(kind, model, prompt)``, or None."""
        return self._entries.get(cache_key(kind, model, prompt))

    def put(self, kind: str, model: str, prompt: str, value: Value) -> None:
        """Store one entry durably (written and fsynced before returning); a no-op when already present."""
        self.put_many(kind, model, [(prompt, value)])

    def put_many(self, kind: str, model: str, items: Iterable[tuple[str, Value]]) -> None:
        """Store several entries with one write and one fsync (a crash can cut only the last line)."""
        with self._lock:
            lines = []
            for prompt, value in items:
                key = cache_key(kind, model, prompt)
                if key in self._entries:
                    continue
                entry = {"key": key, "kind": kind, "value": _encode(value)}
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
                self._entries[key] = value if isinstance(value, str) else np.asarray(value, dtype=np.float32).copy()
            if not lines:
                return
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            payload = "".join(lines).encode("utf-8")
            written = 0
            while written < len(payload):
                written += os.write(self._fd, payload[written:])
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file handle (entries stay readable in memory)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
