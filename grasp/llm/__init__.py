"""Requests to OpenAI-compatible endpoints, shared by :mod:`grasp.generation` and :mod:`grasp.embedding`.

:class:`OpenAIRunner` sends many independent requests (concurrency, retries, failure records, counters);
:class:`ResponseCache` stores every answer on disk as it arrives, so a killed run resumes without repeating
a finished request; :class:`LocalServer` runs llama.cpp's server on this machine for a job. The ``openai``
package is imported only when a runner is made.
"""

from grasp.llm.cache import ResponseCache, ResponseStore, cache_key
from grasp.llm.client import FatalResponse, MalformedResponse, OpenAIRunner, RequestStats, ServerError, string_list
from grasp.llm.local_server import LocalServer, default_model_path

__all__ = [
    "OpenAIRunner",
    "RequestStats",
    "MalformedResponse",
    "FatalResponse",
    "ServerError",
    "LocalServer",
    "default_model_path",
    "string_list",
    "ResponseCache",
    "ResponseStore",
    "cache_key",
]
