"""Requests to OpenAI-compatible endpoints, shared by :mod:`grasp.generation` and :mod:`grasp.embedding`.

:class:`OpenAIRunner` sends many independent requests (concurrency, retries, failure records, counters);
:class:`ResponseCache` stores every answer on disk as it arrives, so a killed run resumes without repeating
a finished request. The ``openai`` package is imported only when a runner is made.
"""

from grasp.llm.cache import ResponseCache, ResponseStore, cache_key
from grasp.llm.client import MalformedResponse, OpenAIRunner, RequestStats, string_list

__all__ = [
    "OpenAIRunner",
    "RequestStats",
    "MalformedResponse",
    "string_list",
    "ResponseCache",
    "ResponseStore",
    "cache_key",
]
