"""The shared cache in front of a text encoder: only texts never embedded before reach the encoder."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grasp._console import progress as progress_bar
from grasp.cache.store import EMBEDDING, SharedCache
from grasp.embedding.encoders import EmbeddingError

__all__ = ["CachedEncoder", "encoder_namespace"]

#: Stored vectors are little-endian float32, whatever the machine.
_FLOAT32 = np.dtype("<f4")


def encoder_namespace(encoder: Any, base_url: str | None = None) -> dict[str, Any]:
    """What identifies the vectors of ``encoder``: its name, its model (a local model folder by its absolute
    path), the server (``base_url``, for an endpoint encoder) and the requested width. Batch size, device,
    concurrency and timeouts are left out: they do not choose the vectors."""
    model = getattr(encoder, "model", None)
    if isinstance(model, str) and Path(model).expanduser().is_dir():
        model = str(Path(model).expanduser().resolve())
    return {"encoder": getattr(encoder, "name", type(encoder).__name__), "model": model, "base_url": base_url,
            "dimensions": getattr(encoder, "dimensions", None)}  # fmt: skip


class CachedEncoder:
    """``encoder`` behind the shared cache: cached texts are read back bit for bit, the others are embedded in
    chunks of ``chunk_size`` texts and each chunk is stored as soon as it is done, so an interrupted run keeps
    the finished chunks.

    Args:
        encoder: any object with ``encode(texts, *, progress) -> [len(texts), D]`` (and a ``name``).
        cache: the shared cache.
        namespace: what identifies the encoder's vectors (:func:`encoder_namespace`).
        chunk_size: texts per call of ``encoder.encode`` (>= 1).

    Attributes:
        stats: the counters of the last :meth:`encode`: texts, unique, cached, embedded, seconds.
    """

    def __init__(self, encoder: Any, cache: SharedCache, namespace: dict[str, Any], *, chunk_size: int = 512) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.encoder = encoder
        self.cache = cache
        self.label = json.dumps(namespace, sort_keys=True)
        self.chunk_size = chunk_size
        self.name = getattr(encoder, "name", type(encoder).__name__)
        self.stats: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"CachedEncoder({self.encoder!r}, cache={self.cache!r}, chunk_size={self.chunk_size})"

    def _cached(self, texts: list[str]) -> dict[str, np.ndarray]:
        found = {}
        for text, blob in self.cache.get_many(EMBEDDING, self.label, texts).items():
            if isinstance(blob, bytes) and blob and len(blob) % _FLOAT32.itemsize == 0:  # else: embed it again
                found[text] = np.frombuffer(blob, dtype=_FLOAT32).astype(np.float32)
        return found

    def _failed(self, error: EmbeddingError, chunk: list[str], texts: list[str], done: int) -> EmbeddingError:
        """``error`` of the encoder on ``chunk``, its failures renumbered as indices of ``texts``."""
        reasons = {chunk[index]: reason for index, reason in error.failures.items()}
        failures = {index: reasons[text] for index, text in enumerate(texts) if text in reasons}
        if not failures:
            return error
        first = next(iter(failures.items()))
        return EmbeddingError(
            f"{self.name}: {len(failures)} of {len(texts)} texts could not be embedded (first: text {first[0]}: "
            f"{first[1]}); the {done} embedded before them are in the shared cache, so running again resumes",
            failures,
        )

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed the texts: float32 ``[len(texts), D]``, each distinct text embedded at most once ever.

        Raises:
            EmbeddingError: the encoder failed on some texts (``.failures`` indexes ``texts``; the chunks done
                before are cached), returned the wrong number of rows, or vectors of another width than
                the cached ones (the model changed under the same name: ``grasp cache clear --embeddings``).
        """
        texts = list(texts)
        if not texts:
            return np.asarray(self.encoder.encode(texts, progress=False), dtype=np.float32)
        started = time.perf_counter()
        unique = list(dict.fromkeys(texts))
        vectors = self._cached(unique)
        cached = len(vectors)
        missing = [text for text in unique if text not in vectors]
        with progress_bar(len(unique), f"embed ({self.name})", "text", enabled=progress and bool(missing),
                          initial=cached) as bar:  # fmt: skip
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start : start + self.chunk_size]
                try:
                    result = np.asarray(self.encoder.encode(chunk, progress=False), dtype=np.float32)
                except EmbeddingError as error:
                    raise self._failed(error, chunk, texts, len(vectors) - cached) from error
                if result.ndim != 2 or result.shape[0] != len(chunk):
                    raise EmbeddingError(f"{self.name} returned shape {result.shape} for {len(chunk)} texts")
                rows = dict(zip(chunk, result, strict=True))
                self.cache.put_many(
                    EMBEDDING, self.label, [(t, row.astype(_FLOAT32).tobytes()) for t, row in rows.items()]
                )
                vectors.update(rows)
                bar.update(len(chunk))
        widths = {vector.shape[0] for vector in vectors.values()}
        if len(widths) > 1:
            raise EmbeddingError(
                f"{self.name}: the shared cache holds vectors of width {sorted(widths)} for one model (was it "
                f"changed in place?); run `grasp cache clear --embeddings` and embed again"
            )
        self.stats = {"texts": len(texts), "unique": len(unique), "cached": cached, "embedded": len(missing),
                      "seconds": time.perf_counter() - started}  # fmt: skip
        return np.stack([vectors[text] for text in texts])
