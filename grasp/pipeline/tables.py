"""The four frozen LLM tables ``U, Ū, I, Ī`` and the neighbour indices, as training reads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from grasp.data.core import DataError

__all__ = ["Tables", "TABLE_FILES", "check_embeddings"]

#: field name -> file name inside the run directory's ``embeddings/`` folder.
TABLE_FILES = {
    "user": "user.npy",
    "user_sim": "user_sim.npy",
    "item": "item.npy",
    "item_sim": "item_sim.npy",
    "user_neighbors": "user_neighbors.npy",
    "item_neighbors": "item_neighbors.npy",
}


@dataclass
class Tables:
    """Frozen embeddings of users and items and the means of their top-k neighbours.

    Attributes:
        user, user_sim: float32 ``[num_users + 1, D]``, ``U`` and ``Ū``; row 0 (padding) is zeros.
        item, item_sim: float32 ``[num_items + 1, D]``, ``I`` and ``Ī``; row 0 is zeros.
        user_neighbors, item_neighbors: int64 ``[n + 1, k]`` ids (1-based) of each row's neighbours; row 0 zeros.
    """

    user: np.ndarray
    user_sim: np.ndarray
    item: np.ndarray
    item_sim: np.ndarray
    user_neighbors: np.ndarray
    item_neighbors: np.ndarray

    @property
    def dim(self) -> int:
        """Embedding width D."""
        return int(self.item.shape[1])

    @classmethod
    def load(cls, directory: str | Path, *, num_users: int | None = None, num_items: int | None = None) -> Tables:
        """Read the tables from ``directory`` and check them (see :func:`check_embeddings`).

        Raises:
            DataError: a file is missing, or a table has NaN / inf, the wrong row count, a non-zero
                padding row, or out-of-range neighbour ids.
        """
        directory = Path(directory)
        arrays = {}
        for name, file in TABLE_FILES.items():
            path = directory / file
            if not path.is_file():
                raise DataError(path, None, "missing; run `grasp embed` and `grasp retrieve` for this run directory")
            arrays[name] = np.load(path, allow_pickle=False)
        rows = {"user": num_users, "item": num_items}
        for side in ("user", "item"):
            n = rows[side] if rows[side] is not None else len(arrays[side]) - 1
            for name in (side, f"{side}_sim"):
                check_embeddings(arrays[name], n + 1, directory / TABLE_FILES[name])
            neighbors = arrays[f"{side}_neighbors"]
            path = directory / TABLE_FILES[f"{side}_neighbors"]
            if neighbors.ndim != 2 or len(neighbors) != n + 1:
                raise DataError(path, None, f"shape {tuple(neighbors.shape)}, expected ({n + 1}, k)")
            if neighbors.size and (neighbors[1:].min() < 1 or neighbors.max() > n):
                raise DataError(path, None, f"neighbour ids must lie in 1..{n}")
        if arrays["user"].shape[1] != arrays["item"].shape[1]:
            raise DataError(
                directory, None, f"user tables are {arrays['user'].shape[1]}-d, item tables {arrays['item'].shape[1]}-d"
            )
        return cls(**{name: arrays[name] for name in TABLE_FILES})


def check_embeddings(array: np.ndarray, rows: int, path: str | Path) -> None:
    """Raise :class:`DataError` unless ``array`` is a finite float ``[rows, D]`` table with a zero row 0."""
    if array.ndim != 2 or array.shape[1] < 1:
        raise DataError(path, None, f"embeddings must be 2-d [rows, D], got shape {tuple(array.shape)}")
    if len(array) != rows:
        raise DataError(path, None, f"{len(array)} rows, expected {rows} (one per id plus the padding row 0)")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(path, None, f"embeddings must be floating point, got {array.dtype}")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(path, None, f"{len(bad)} rows hold NaN or inf (first: row {bad[0]})")
    if np.any(array[0] != 0):
        raise DataError(path, None, "row 0 is padding and must be all zeros")
