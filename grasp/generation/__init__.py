"""Generation (docs/design.md section 1, stage 2): paper-style prompts, LLM or template descriptions, a resumable cache.

``item_prompts`` / ``user_prompts`` build one prompt per item / user from a :class:`~grasp.data.Dataset`;
a generator from :func:`make_generator` (``"template"`` offline, ``"openai"`` for any OpenAI-compatible
endpoint) turns them into descriptions; :mod:`grasp.generation.quality` measures echoed prompts and invented
years in them. The ``openai`` package is imported only when an OpenAI endpoint is used.
"""

from grasp.generation.generators import (
    DEFAULT_SYSTEM_PROMPT,
    GENERATORS,
    GenerationResult,
    OpenAIGenerator,
    TemplateGenerator,
    make_generator,
)
from grasp.generation.prompts import (
    ITEM_PLACEHOLDERS,
    USER_PLACEHOLDERS,
    PromptTemplates,
    item_prompts,
    user_prompts,
)
from grasp.generation.quality import echo_rate, invented_year_rate, latest_year
from grasp.llm import MalformedResponse, OpenAIRunner, RequestStats, ResponseCache, cache_key

__all__ = [
    "PromptTemplates",
    "item_prompts",
    "user_prompts",
    "ITEM_PLACEHOLDERS",
    "USER_PLACEHOLDERS",
    "ResponseCache",
    "cache_key",
    "GenerationResult",
    "TemplateGenerator",
    "OpenAIGenerator",
    "make_generator",
    "GENERATORS",
    "DEFAULT_SYSTEM_PROMPT",
    "OpenAIRunner",
    "RequestStats",
    "MalformedResponse",
    "echo_rate",
    "invented_year_rate",
    "latest_year",
]
