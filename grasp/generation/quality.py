"""Two failure rates of LLM descriptions that need no labels: echoed prompts and invented years.

* An answer *echoes* its prompt when it mostly repeats it: at least half of the prompt's word 4-grams
  (lower case, punctuation ignored) occur in the answer. A small model that lists the attributes back
  instead of describing the item does this.
* An answer *invents a year* when it names a year (1900-2099) later than the newest year the data can know
  of (for MovieLens 100K, 1998): a fact that cannot be right.

Both ignore rows whose prompt or answer is empty (the padding row).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["echoes", "echo_rate", "invented_year_rate", "latest_year", "ECHO_THRESHOLD"]

#: The fraction of the prompt's word 4-grams that makes an answer an echo.
ECHO_THRESHOLD = 0.5
_WORD = re.compile(r"[a-z0-9]+")
_YEAR = re.compile(r"\b(19\d\d|20\d\d)\b")


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def echoes(prompt: str, answer: str) -> bool:
    """Whether ``answer`` repeats most of ``prompt`` (see the module doc)."""
    grams = _grams(prompt)
    if not grams:
        return False
    return len(grams & _grams(answer)) >= ECHO_THRESHOLD * len(grams)


def echo_rate(prompts: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of non-empty (prompt, answer) pairs where the answer echoes the prompt (0 when none)."""
    pairs = [(p, a) for p, a in zip(prompts, answers, strict=True) if p and a]
    return sum(echoes(p, a) for p, a in pairs) / len(pairs) if pairs else 0.0


def invented_year_rate(answers: Sequence[str], latest: int) -> float:
    """The fraction of non-empty answers naming a year after ``latest`` (0 when there are none)."""
    texts = [a for a in answers if a]
    return sum(any(int(y) > latest for y in _YEAR.findall(t)) for t in texts) / len(texts) if texts else 0.0


def latest_year(item_attributes: dict[int, dict[str, str]]) -> int | None:
    """The newest year among the items' ``year`` attributes (or the years in a ``date``/``release date``
    attribute), or None when the data has none."""
    years = []
    for attributes in item_attributes.values():
        for name, value in attributes.items():
            if name.strip().lower().replace("_", " ") in ("year", "date", "release date"):
                years += [int(y) for y in _YEAR.findall(str(value))]
    return max(years) if years else None
