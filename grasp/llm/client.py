"""Shared request machinery for OpenAI-compatible endpoints (chat completions and embeddings).

:class:`OpenAIRunner` sends many independent requests with bounded concurrency through the official
``openai`` client. The client itself retries HTTP 408, 409, 429 and 5xx, timeouts and connection errors, with
exponential backoff and jitter, honouring ``retry-after``. The runner adds what the client lacks: it retries
answers that arrive but are empty or malformed (exponential backoff with full jitter), and it records a task
that still fails as a failure (task index -> reason) instead of raising. One ``max_retries`` budget covers
both kinds of retry. Other errors (400, 422, ...) are not retried. An answer that no request can change
(401, 403, 404, a model the server does not have, a response the server is configured to give wrongly)
stops the whole run at once with :class:`ServerError` carrying the server's message.

The requests run in daemon threads: an interrupted run (Ctrl-C) returns at once, abandoning the requests
in flight, and keeps every answer that had arrived (each was handed to ``on_success`` as it came).

The API key is read from the environment variable ``api_key_env`` (``OPENAI_API_KEY`` by default). When it
is unset and the endpoint is local (``localhost``, ``127.x.x.x``, ``::1``; servers such as vLLM or Ollama
accept any key) a placeholder key is used; otherwise construction fails naming the variable. The key never
appears in a repr, a log message or a failure reason (reasons are scrubbed of it).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar
from urllib.parse import urlparse

from grasp._console import progress as progress_bar

if TYPE_CHECKING:
    import openai

__all__ = ["OpenAIRunner", "RequestStats", "MalformedResponse", "FatalResponse", "ServerError", "string_list"]


def string_list(values: Sequence[str], name: str) -> list[str]:
    """``values`` as a list, or ``ValueError`` naming the first entry that is not a string (``name[i]``)."""
    values = list(values)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"{name}[{index}] must be a string, got {type(value).__name__}")
    return values


log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_LOCAL_HOSTS = ("localhost", "::1", "0.0.0.0")
_PLACEHOLDER_KEY = "sk-local-placeholder"


class MalformedResponse(Exception):
    """A response without usable content (empty choices or content, wrong shape); the request is retried."""


class FatalResponse(Exception):
    """A response that shows the server is set up so that no request can succeed (for example one embedding
    per token instead of one per text); the run stops with its message."""


class ServerError(RuntimeError):
    """The server refused in a way no retry changes (401, 403, 404, an unknown model, a :class:`FatalResponse`).

    Attributes:
        reason: the server's answer, scrubbed of the API key.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class RequestStats:
    """Counters of one run: requests sent (retries included), retries, failed tasks and ``usage`` tokens."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return asdict(self)

    def add(self, other: RequestStats) -> None:
        """Add ``other``'s counters to these."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def _openai() -> ModuleType:
    """The ``openai`` package, imported on first use (it is an optional dependency)."""
    try:
        import openai
    except ImportError as error:
        raise ImportError("the OpenAI endpoints need the openai package: pip install 'grasp[openai]'") from error
    return openai


def _is_local(base_url: str | None) -> bool:
    host = urlparse(base_url or "").hostname or ""
    return host in _LOCAL_HOSTS or host.startswith("127.")


class OpenAIRunner(Generic[T, R]):
    """Runs independent requests against an OpenAI-compatible endpoint: concurrency, retries, failures, stats.

    Args:
        base_url: the API root (``http://host:port/v1``); the ``openai`` default (``OPENAI_BASE_URL`` or
            api.openai.com) when None.
        api_key_env: the environment variable holding the API key.
        concurrency: requests in flight at once (>= 1).
        timeout: seconds per request (> 0).
        max_retries: retries per task after the first request (>= 0), shared by the client's retries of
            HTTP errors, timeouts and connection errors and the runner's retries of empty or malformed answers.
        backoff_base, backoff_max: the n-th retry of an empty or malformed answer waits a uniform random time
            in ``[0, min(backoff_max, backoff_base * 2**n)]`` (full jitter). The client times its own retries.

    Raises:
        ValueError: a bad argument, or the key variable unset for a non-local endpoint.
        ImportError: the ``openai`` package is not installed.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError(f"backoff_base and backoff_max must be >= 0, got {backoff_base} and {backoff_max}")
        self.base_url = base_url
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        key = os.environ.get(api_key_env, "")
        if not key:
            if not _is_local(base_url or os.environ.get("OPENAI_BASE_URL")):
                raise ValueError(
                    f"the environment variable {api_key_env} is not set: set it to your API key "
                    "(a local base_url such as http://127.0.0.1:8000/v1 needs none)"
                )
            key = _PLACEHOLDER_KEY
        self._key = key
        openai = _openai()
        # The request hook counts every HTTP request, the client's retries included, per sending thread.
        http_client = openai.DefaultHttpxClient(event_hooks={"request": [self._count_request]})
        self._client = openai.OpenAI(
            api_key=key, base_url=base_url, timeout=timeout, max_retries=max_retries, http_client=http_client
        )
        self._sent = threading.local()
        self._random = random.Random()

    def __repr__(self) -> str:
        return (
            f"OpenAIRunner(base_url={self.base_url!r}, concurrency={self.concurrency}, timeout={self.timeout}, "
            f"max_retries={self.max_retries})"
        )

    def _count_request(self, request: object) -> None:
        """The HTTP client's request hook: one more request sent by the calling thread's task."""
        self._sent.count = getattr(self._sent, "count", 0) + 1

    def _scrub(self, text: str) -> str:
        return " ".join(text.replace(self._key, "***").split())[:300]

    def _classify(self, error: Exception) -> tuple[str, str]:
        """(what to do, reason) for an error raised by a request or its parsing: ``"retry"`` here, ``"fail"``
        this task (the client already retried what can be retried) or ``"stop"`` the whole run."""
        openai = _openai()
        if isinstance(error, FatalResponse):
            return "stop", str(error)
        if isinstance(error, (MalformedResponse, openai.APIResponseValidationError, ValueError)):
            return "retry", f"malformed response: {error}"
        if isinstance(error, openai.APITimeoutError):
            return "fail", f"timeout after {self.timeout} s"
        if isinstance(error, openai.APIConnectionError):
            return "fail", f"connection error: {error}"
        if isinstance(error, openai.APIStatusError):
            message = error.message
            try:  # a body the client does not read its message from (e.g. {"detail": ...}): keep the server's words
                body = error.response.text.strip()
            except Exception:  # a response whose body cannot be read (streamed, closed)
                body = ""
            if body and body not in message and (error.body is None or str(error.body) not in message):
                message = f"{message}: {body}"
            reason = f"HTTP {error.status_code}: {message}"
            unknown_model = "model" in message.lower() and any(
                words in message.lower() for words in ("not found", "does not exist", "unknown", "no such")
            )
            return ("stop" if error.status_code in (401, 403, 404) or unknown_model else "fail"), reason
        raise error

    def _attempts(
        self,
        task: T,
        request: Callable[[openai.OpenAI, T], Any],
        parse: Callable[[T, Any], R],
        stats: RequestStats,
        lock: threading.Lock,
        stop: threading.Event,
    ) -> tuple[R | None, str | None]:
        """Send one task until it succeeds, fails for good or the run stops: (value, None) or (None, reason).

        Every HTTP request after the task's first counts as a retry, whether the client or this loop sent it.
        """
        self._sent.count = 0
        try:
            while True:
                sent_before = self._sent.count
                try:
                    response = request(self._client_for_next_attempt(), task)
                    self._add_usage(response, stats, lock)
                    return parse(task, response), None
                except Exception as error:  # _classify re-raises what it does not know
                    action, reason = self._classify(error)
                    reason = self._scrub(reason)
                if action == "stop":
                    raise ServerError(reason)
                self._sent.count = max(self._sent.count, sent_before + 1)  # an attempt spends budget even unsent
                retries = self._sent.count - 1
                if action == "fail" or retries >= self.max_retries:
                    return None, reason + (f" (after {_plural(retries, 'retry', 'retries')})" if retries > 0 else "")
                delay = self._random.uniform(0, min(self.backoff_max, self.backoff_base * 2**retries))
                log.debug("retry %d/%d in %.2f s: %s", retries + 1, self.max_retries, delay, reason)
                if stop.wait(delay):
                    return None, "stopped"
        finally:
            with lock:
                stats.requests += self._sent.count
                stats.retries += max(self._sent.count - 1, 0)

    @staticmethod
    def _add_usage(response: Any, stats: RequestStats, lock: threading.Lock) -> None:
        """Add the response's ``usage`` token counts (also for answers that turn out malformed: they are billed)."""
        usage = getattr(response, "usage", None)
        with lock:
            stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)

    def _client_for_next_attempt(self) -> openai.OpenAI:
        """The client, its retry budget cut by the requests this thread's task has already sent."""
        if self._sent.count == 0:
            return self._client
        return self._client.with_options(max_retries=self.max_retries - self._sent.count)

    def run(
        self,
        tasks: Sequence[T],
        request: Callable[[openai.OpenAI, T], Any],
        parse: Callable[[T, Any], R],
        on_success: Callable[[int, R], None],
        *,
        weights: Sequence[int] | None = None,
        initial: int = 0,
        desc: str = "requests",
        unit: str = "it",
        progress: bool = True,
        stats: RequestStats | None = None,
    ) -> tuple[dict[int, str], RequestStats]:
        """Run every task; return the failures (task index -> reason) and the counters.

        Args:
            tasks: one entry per request.
            request: sends one task with the given client and returns the response object.
            parse: turns a response into the value, raising :class:`MalformedResponse` when it is unusable
                (retried) or :class:`FatalResponse` when no request can succeed (stops the run).
            on_success: called with (task index, value) in a worker thread as soon as a task succeeds (store
                it durably here, so a killed run does not repeat it).
            weights: progress units per task (e.g. texts per batch); 1 each by default.
            initial: progress units already done (e.g. cached entries); the bar's total adds them to the weights.
            desc, unit, progress: the progress bar's label and unit, and whether to show it (on stderr).
            stats: counters to add this run's to (they stay up to date when the run is interrupted or
                stopped); a new one by default.

        Raises:
            ServerError: the server refused in a way no retry changes; the run stopped at its first such answer.
            KeyboardInterrupt: passed on at once; requests in flight are abandoned.
        """
        weights = list(weights) if weights is not None else [1] * len(tasks)
        stats = stats if stats is not None else RequestStats()
        lock, stop = threading.Lock(), threading.Event()
        failures: dict[int, str] = {}
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        done: queue.SimpleQueue[tuple[int, str | None, BaseException | None]] = queue.SimpleQueue()
        for index in range(len(tasks)):
            todo.put(index)

        def worker() -> None:
            while not stop.is_set():
                try:
                    index = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    value, reason = self._attempts(tasks[index], request, parse, stats, lock, stop)
                    if reason is None:
                        on_success(index, value)
                    done.put((index, reason, None))
                except BaseException as error:  # a ServerError, or a bug: handed to the caller's thread
                    done.put((index, None, error))
                    return

        bar = progress_bar(sum(weights) + initial, desc, unit, enabled=progress, initial=initial)
        started = time.perf_counter()
        # Daemon threads: an interrupted run must not wait for the requests in flight, at exit either.
        threads = [threading.Thread(target=worker, name=f"grasp-openai-{n}", daemon=True)
                   for n in range(min(self.concurrency, len(tasks)))]  # fmt: skip
        try:
            for thread in threads:
                thread.start()
            for _ in range(len(tasks)):
                index, reason, error = done.get()
                if error is not None:
                    raise error
                if reason is not None:
                    failures[index] = reason
                    log.warning("request %d failed: %s", index, reason)
                bar.update(weights[index])
                bar.set_postfix(failures=len(failures), retries=stats.retries)
        finally:
            stop.set()  # on an error or Ctrl-C: no new request starts, retry waits end
            bar.close()
        stats.failures += len(failures)
        log.info("%d requests (%d retries, %d failures) in %.1f s", stats.requests, stats.retries,
                 stats.failures, time.perf_counter() - started)  # fmt: skip
        return failures, stats


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"
