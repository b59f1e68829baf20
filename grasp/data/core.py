"""The core data types of grasp.data: :class:`RawDataset` (what every loader returns) and :class:`DataError`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["DataError", "RawDataset"]


class DataError(ValueError):
    """Bad input data; the message names the file, the line (when there is one) and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


@dataclass
class RawDataset:
    """Interactions and text attributes as read from disk, before any filtering or id remapping.

    Attributes:
        name: dataset name (e.g. ``"ml-100k"``).
        users: user tokens (``str``, object array), one per interaction, in file order.
        items: item tokens (``str``, object array), parallel to ``users``.
        timestamps: float64 timestamps, parallel to ``users``.
        item_attributes: item token -> {attribute name: text}; items may be missing or have ``{}``.
        user_attributes: user token -> {attribute name: text}; empty when the dataset has none.
        domain: what the items are, for prompts ("movie", "office product"; "" when unknown).
    """

    name: str
    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    item_attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    user_attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    domain: str = ""

    def __post_init__(self) -> None:
        n = len(self.users)
        if len(self.items) != n or len(self.timestamps) != n:
            raise ValueError(
                f"RawDataset {self.name!r}: users, items and timestamps must have one entry per interaction, "
                f"got {n}, {len(self.items)} and {len(self.timestamps)}"
            )

    def __len__(self) -> int:
        return len(self.users)
