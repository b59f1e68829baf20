"""Saving and loading a preprocessed :class:`~grasp.data.preprocess.Dataset` in a run directory.

A dataset is two files: ``dataset.json`` (names, counts, tokens, thresholds, attributes) and
``interactions.npz`` (each user's items and timestamps, flattened with offsets, and the head / tail
flags). Both are written atomically; :func:`load_dataset` checks that they agree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from grasp._io import write_bytes, write_json
from grasp.data.core import DataError
from grasp.data.preprocess import Dataset

__all__ = ["save_dataset", "load_dataset"]

_FORMAT = 1


def save_dataset(dataset: Dataset, directory: str | Path) -> list[Path]:
    """Write ``dataset`` into ``directory`` (created if needed); returns the written paths."""
    directory = Path(directory)
    lengths = np.array([len(s) for s in dataset.sequences], dtype=np.int64)
    arrays = {
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "items": np.concatenate(dataset.sequences).astype(np.int64),
        "timestamps": np.concatenate(dataset.timestamps).astype(np.float64),
        "item_popularity": dataset.item_popularity.astype(np.int64),
        "user_is_head": dataset.user_is_head.astype(bool),
        "item_is_head": dataset.item_is_head.astype(bool),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    meta = {
        "format": _FORMAT,
        "name": dataset.name,
        "domain": dataset.domain,
        "num_users": dataset.num_users,
        "num_items": dataset.num_items,
        "head_fraction": dataset.head_fraction,
        "head_user_threshold": dataset.head_user_threshold,
        "head_item_threshold": dataset.head_item_threshold,
        "filters": dataset.filters,
        "user_tokens": dataset.user_tokens,
        "item_tokens": dataset.item_tokens,
        "item_attributes": {str(k): v for k, v in dataset.item_attributes.items()},
        "user_attributes": {str(k): v for k, v in dataset.user_attributes.items()},
    }
    return [
        write_bytes(directory / "interactions.npz", buffer.getvalue()),
        write_json(directory / "dataset.json", meta),
    ]


def load_dataset(directory: str | Path) -> Dataset:
    """Read a dataset written by :func:`save_dataset`.

    Raises:
        DataError: a file is missing, unreadable, of another format version, or the two files disagree.
    """
    directory = Path(directory)
    meta_path, arrays_path = directory / "dataset.json", directory / "interactions.npz"
    for path in (meta_path, arrays_path):
        if not path.is_file():
            raise DataError(path, None, "missing; run `grasp prepare` for this run directory first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(meta_path, getattr(error, "lineno", None), f"not valid JSON: {error}") from None
    if meta.get("format") != _FORMAT:
        raise DataError(meta_path, None, f"format {meta.get('format')!r}, this grasp reads format {_FORMAT}")
    with np.load(arrays_path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    num_users, num_items = meta["num_users"], meta["num_items"]
    offsets = arrays["offsets"]
    if len(offsets) != num_users + 2 or len(arrays["item_popularity"]) != num_items + 1:
        raise DataError(
            arrays_path,
            None,
            f"holds {len(offsets) - 2} users and {len(arrays['item_popularity']) - 1} items, "
            f"{meta_path.name} says {num_users} and {num_items}",
        )
    sequences = [arrays["items"][offsets[u] : offsets[u + 1]] for u in range(num_users + 1)]
    timestamps = [arrays["timestamps"][offsets[u] : offsets[u + 1]] for u in range(num_users + 1)]
    return Dataset(
        name=meta["name"],
        num_users=num_users,
        num_items=num_items,
        user_tokens=meta["user_tokens"],
        item_tokens=meta["item_tokens"],
        sequences=sequences,
        timestamps=timestamps,
        item_popularity=arrays["item_popularity"],
        head_fraction=meta["head_fraction"],
        head_user_threshold=meta["head_user_threshold"],
        head_item_threshold=meta["head_item_threshold"],
        user_is_head=arrays["user_is_head"],
        item_is_head=arrays["item_is_head"],
        item_attributes={int(k): v for k, v in meta["item_attributes"].items()},
        user_attributes={int(k): v for k, v in meta["user_attributes"].items()},
        filters=meta["filters"],
        domain=meta["domain"],
    )
