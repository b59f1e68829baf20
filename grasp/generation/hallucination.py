"""Controlled hallucination: a chosen share of descriptions replaced by those of other entities.

A hallucinating LLM writes a fluent, confident description of the wrong thing. :func:`swap_descriptions`
makes exactly that, in a measured amount: a random fraction ``rate`` of the rows get the description of
another random row of the same kind (another item for an item, another user for a user). The robustness
benchmark trains on such texts to see how much each model loses as the rate grows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["swap_descriptions"]


def swap_descriptions(
    texts: Sequence[str], rate: float, seed: int, stream: int = 0
) -> tuple[list[str], dict[int, int]]:
    """Replace the texts of ``round(rate * n)`` random rows of ``texts[1:]`` by those of other random rows.

    Args:
        texts: one description per row; row 0 is padding and is never chosen or copied.
        rate: the fraction of rows to replace, in [0, 1].
        seed, stream: the random choice (``stream`` separates sides: 0 items, 1 users).

    Returns:
        The new texts and ``{row: source row}`` for every replaced row (each source differs from its row;
        the source's own, original text is what is copied).

    Raises:
        ValueError: ``rate`` outside [0, 1], or rows to replace with fewer than two rows to draw from.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--hallucination-rate must be in [0, 1], got {rate}")
    n = len(texts) - 1
    count = int(round(rate * n))
    if count == 0:
        return list(texts), {}
    if n < 2:
        raise ValueError(f"--hallucination-rate {rate} needs at least two rows to swap descriptions, got {n}")
    rng = np.random.default_rng([seed, stream])
    rows = rng.choice(np.arange(1, n + 1), size=count, replace=False)
    sources = rng.integers(1, n, size=count)  # uniform over the n - 1 other rows:
    sources = sources + (sources >= rows)  # skip the row itself
    out = list(texts)
    mapping = {}
    for row, source in zip(rows.tolist(), sources.tolist(), strict=True):
        out[row] = texts[source]
        mapping[row] = source
    return out, mapping
