"""Text generators: prompts in, descriptions out (docs/design.md section 1, stage 2).

* :class:`TemplateGenerator` (the offline default) uses each filled prompt as the description: no LLM, instant.
* :class:`OpenAIGenerator` asks an OpenAI-compatible chat-completions endpoint, with bounded concurrency,
  retries and an on-disk :class:`~grasp.llm.ResponseCache`: cached prompts cost no request and
  every answer is stored as soon as it arrives, so a killed run resumes without repeating finished requests.

Both skip ``""`` prompts (the padding row), whose text is ``""``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from grasp.llm import MalformedResponse, OpenAIRunner, RequestStats, ResponseCache, ResponseStore, string_list

__all__ = [
    "GenerationResult",
    "TemplateGenerator",
    "OpenAIGenerator",
    "make_generator",
    "GENERATORS",
    "DEFAULT_SYSTEM_PROMPT",
]

#: Names accepted by :func:`make_generator` (``local`` is ``openai`` against a llama.cpp server that
#: :class:`grasp.llm.LocalServer` starts; :func:`grasp.pipeline.stages.generate` does that).
GENERATORS = ("template", "openai", "local")

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert in recommender systems. Given information about an item or a user, write a concise, "
    "factual description of about 100 words: for an item, what it is and what kind of person would enjoy it; "
    "for a user, their preferences. Answer with the description only."
)


@dataclass
class GenerationResult:
    """The outcome of :meth:`generate`.

    Attributes:
        texts: one entry per prompt: the description, ``""`` for an empty prompt, None where it failed.
        failures: prompt index -> reason, for every None in ``texts``.
        stats: counters: ``prompts`` (non-empty), ``unique``, ``cached``, ``requests`` (retries included),
            ``retries``, ``failures``, ``prompt_tokens``, ``completion_tokens``, ``seconds``.
    """

    texts: list[str | None]
    failures: dict[int, str] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def _empty_stats(prompts: list[str]) -> dict[str, float]:
    unique = len({p for p in prompts if p})
    return {"prompts": sum(1 for p in prompts if p), "unique": unique, "cached": 0, "requests": 0, "retries": 0,
            "failures": 0, "prompt_tokens": 0, "completion_tokens": 0, "seconds": 0.0}  # fmt: skip


class TemplateGenerator:
    """The offline generator: each description is the filled prompt itself (no LLM)."""

    name = "template"

    def __repr__(self) -> str:
        return "TemplateGenerator()"

    def generate(self, prompts: Sequence[str], *, progress: bool = True) -> GenerationResult:
        """Return the prompts as the texts (``progress`` is accepted for a uniform API; this is instant)."""
        prompts = string_list(prompts, "prompts")
        return GenerationResult(texts=list(prompts), failures={}, stats=_empty_stats(prompts))


class OpenAIGenerator:
    """Descriptions from an OpenAI-compatible chat-completions endpoint.

    Args:
        model: the model name sent to the endpoint.
        base_url: the API root (e.g. ``http://127.0.0.1:8000/v1`` for vLLM); OpenAI's by default.
        concurrency, timeout, max_retries, backoff_base, backoff_max, api_key_env: see
            :class:`~grasp.llm.OpenAIRunner` (the key comes from the environment only).
        cache: a :class:`ResponseCache` (or another :class:`~grasp.llm.ResponseStore`, such as the shared
            cache of :mod:`grasp.cache`) or its path; None keeps nothing (no resume).
        system_prompt: the system message sent before every prompt.
        temperature, max_tokens: sampling settings sent with every request (None leaves them out).

    Answers are cached by model, system prompt, temperature, max_tokens and prompt, not by the server's
    address: the same server reached as ``localhost`` or ``127.0.0.1`` answers from the cache. Each entry
    records the server that gave it. ``totals`` adds up the requests of every :meth:`generate` call.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        cache: ResponseStore | str | Path | None = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        temperature: float | None = 0.0,
        max_tokens: int | None = 300,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        api_key_env: str = "OPENAI_API_KEY",
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
        if temperature is not None and not 0 <= temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2] or None, got {temperature}")
        if not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string ('' for none), got {type(system_prompt).__name__}")
        self.model = model
        self.name = f"openai:{model}"
        self.cache = ResponseCache(cache) if isinstance(cache, (str, Path)) else cache
        self._runner: OpenAIRunner[str, str] = OpenAIRunner(
            base_url=base_url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
            max_retries=max_retries, backoff_base=backoff_base, backoff_max=backoff_max,
        )  # fmt: skip
        self._options: dict[str, Any] = {"model": model}
        if temperature is not None:
            self._options["temperature"] = temperature
        if max_tokens is not None:
            self._options["max_tokens"] = max_tokens
        self.system_prompt = system_prompt
        self.totals = RequestStats()
        # The server that answers: with no base_url, the openai client takes OPENAI_BASE_URL when it is set.
        self.server = _without_credentials(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        # "record": entries hold {"answer", "server"} (entries of older versions, keyed with the server's
        # address, live in other namespaces and are not read).
        self._variant = json.dumps({**self._options, "system_prompt": system_prompt, "record": 2}, sort_keys=True)

    def __repr__(self) -> str:
        return f"OpenAIGenerator(model={self.model!r}, runner={self._runner!r}, cache={self.cache!r})"

    def _request(self, client: Any, prompt: str) -> Any:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return client.chat.completions.create(
            messages=[*messages, {"role": "user", "content": prompt}], **self._options
        )

    @staticmethod
    def _parse(prompt: str, response: Any) -> str:
        choices = getattr(response, "choices", None)
        if not choices:
            raise MalformedResponse("no choices in the response")
        content = getattr(getattr(choices[0], "message", None), "content", None)
        if not isinstance(content, str) or not content.strip():
            raise MalformedResponse("empty message content")
        return content.strip()

    def generate(self, prompts: Sequence[str], *, progress: bool = True) -> GenerationResult:
        """Describe every non-empty prompt (identical prompts are asked once); failures are recorded, not raised.

        Args:
            prompts: the prompts; ``""`` entries are skipped and get ``""``.
            progress: show a progress bar (done / total, rate, failures, retries) on stderr.
        """
        prompts = string_list(prompts, "prompts")
        started = time.perf_counter()
        stats = _empty_stats(prompts)
        answers: dict[str, str] = {}
        pending: list[str] = []
        for prompt in dict.fromkeys(p for p in prompts if p):
            cached = _answer(self.cache.get("chat", self._variant, prompt)) if self.cache is not None else None
            if cached is not None:
                answers[prompt] = cached
            else:
                pending.append(prompt)
        stats["cached"] = len(answers)

        def store(index: int, text: str) -> None:
            if self.cache is not None:
                record = json.dumps({"answer": text, "server": self.server}, ensure_ascii=False)
                self.cache.put("chat", self._variant, pending[index], record)
            answers[pending[index]] = text

        counters = RequestStats()
        try:
            failed, _ = self._runner.run(
                pending, self._request, self._parse, store, initial=len(answers), desc=f"generate ({self.model})",
                unit="prompt", progress=progress, stats=counters,
            )  # fmt: skip
        finally:
            self.totals.add(counters)
        reasons = {pending[index]: reason for index, reason in failed.items()}
        texts = [answers.get(p) if p else "" for p in prompts]
        failures = {index: reasons[p] for index, p in enumerate(prompts) if p in reasons}
        stats.update(counters.as_dict(), failures=len(failures), seconds=time.perf_counter() - started)
        return GenerationResult(texts=texts, failures=failures, stats=stats)


def _answer(entry: object) -> str | None:
    """The answer of a cache entry (a JSON record ``{"answer", "server"}``), or None."""
    if not isinstance(entry, str):
        return None
    try:
        record = json.loads(entry)
    except json.JSONDecodeError:
        return None
    answer = record.get("answer") if isinstance(record, dict) else None
    return answer if isinstance(answer, str) else None


def _without_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part, so no secret reaches the cache."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1])) if "@" in parts.netloc else url


def make_generator(name: str, **options: Any) -> TemplateGenerator | OpenAIGenerator:
    """A generator by name: ``"template"`` (takes no options) or ``"openai"`` (options go to :class:`OpenAIGenerator`;
    ``"local"`` is accepted as ``"openai"`` with the ``base_url`` of a running local server).

    Raises:
        ValueError: an unknown name, or options given to the template generator.
    """
    if name == "template":
        if options:
            raise ValueError(f"the template generator takes no options, got {', '.join(sorted(options))}")
        return TemplateGenerator()
    if name in ("openai", "local"):
        return OpenAIGenerator(**options)
    raise ValueError(f"unknown generator {name!r} (choose from {', '.join(GENERATORS)})")
