"""The shared cache behind the LLM generators: an answer asked once is never asked again, in any run."""

from __future__ import annotations

import logging
from pathlib import Path

from grasp.cache.store import SharedCache, open_shared_cache
from grasp.data.core import DataError
from grasp.llm.cache import ResponseCache, ResponseStore

__all__ = ["SharedResponses", "generation_cache"]

log = logging.getLogger(__name__)


class SharedResponses:
    """LLM answers in the shared cache, with the methods of :class:`~grasp.llm.ResponseCache` (text values).

    ``kind`` and ``model`` (everything that changes the answer: model, server, system prompt, sampling)
    name the namespace, the prompt the entry.

    Args:
        cache: the shared cache.
        legacy: a per-run cache of an older version, read as well: an answer found only there is copied
            into the shared cache when it is used.
    """

    def __init__(self, cache: SharedCache, legacy: ResponseCache | None = None) -> None:
        self.cache = cache
        self.legacy = legacy

    def __repr__(self) -> str:
        return f"SharedResponses({self.cache!r}, legacy={self.legacy!r})"

    def get(self, kind: str, model: str, prompt: str) -> str | None:
        """The stored answer to ``prompt``, or None."""
        value = self.cache.get_many(kind, model, [prompt]).get(prompt)
        if isinstance(value, str):
            return value
        value = self.legacy.get(kind, model, prompt) if self.legacy is not None else None
        if not isinstance(value, str):
            return None
        self.put(kind, model, prompt, value)
        return value

    def put(self, kind: str, model: str, prompt: str, value: str) -> None:
        """Store one answer (committed before returning); an answer already stored is kept."""
        self.cache.put_many(kind, model, [(prompt, value)])

    def close(self) -> None:
        """Close the shared cache's connection and the legacy file."""
        self.cache.close()
        if self.legacy is not None:
            self.legacy.close()


def generation_cache(run_file: str | Path) -> ResponseStore:
    """The cache of the generate stage: the shared cache, reading the run's own ``run_file`` of older
    versions too when it exists, or, with ``GRASP_CACHE=off``, ``run_file`` alone (as before)."""
    run_file = Path(run_file)
    shared = open_shared_cache()
    if shared is None:
        return ResponseCache(run_file)
    legacy = None
    if run_file.is_file():
        try:
            legacy = ResponseCache(run_file)
        except (DataError, OSError) as error:
            log.warning("ignoring the per-run cache %s: %s", run_file, error)
    return SharedResponses(shared, legacy)
