"""Preprocessing of a :class:`~grasp.data.core.RawDataset` (docs/design.md section 7).

:func:`preprocess` orders each user's interactions by time (stable on ties, so equal timestamps keep
the file order), applies an iterative k-core filter and a minimum history length, remaps users and
items to ``1..n`` (0 is padding) in order of first appearance, splits each history leave-one-out
(last = test, second to last = validation, the rest = train) and marks head / tail users and items
by training statistics. :func:`statistics` and :func:`statistics_table` summarise the result like
Table 1 of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from grasp.data.core import RawDataset

__all__ = ["Dataset", "preprocess", "statistics", "statistics_table", "head_threshold"]


@dataclass
class Dataset:
    """A filtered, remapped and split dataset. Ids run over ``1..num_users`` / ``1..num_items``; 0 is padding.

    Per-user lists and arrays are indexed by user id, with an empty / zero entry at index 0.

    Attributes:
        name: dataset name.
        num_users, num_items: counts after filtering.
        user_tokens, item_tokens: original token of each id (``""`` at index 0).
        user_ids, item_ids: original token -> id (derived from the tokens).
        sequences: each user's items (int64) in time order, the whole history.
        timestamps: the matching float64 timestamps.
        train: ``sequences[u][:-2]``; valid_items / test_items: ``sequences[u][-2]`` / ``sequences[u][-1]``
            (derived from the sequences: leave-one-out).
        item_popularity: training interactions per item (int64, length ``num_items + 1``).
        head_fraction: the fraction used for the head / tail split.
        head_user_threshold: users with at least this many training items are head users.
        head_item_threshold: items with at least this many training interactions are head items.
        user_is_head, item_is_head: boolean arrays (index 0 False).
        item_attributes, user_attributes: id -> text attributes (``{}`` when the raw data had none).
        filters: the filter settings used, for reports.
        domain: what the items are, for prompts (from the raw dataset).
    """

    name: str
    num_users: int
    num_items: int
    user_tokens: list[str]
    item_tokens: list[str]
    user_ids: dict[str, int] = field(init=False)
    item_ids: dict[str, int] = field(init=False)
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray]
    train: list[np.ndarray] = field(init=False)
    valid_items: np.ndarray = field(init=False)
    test_items: np.ndarray = field(init=False)
    item_popularity: np.ndarray
    head_fraction: float
    head_user_threshold: int
    head_item_threshold: int
    user_is_head: np.ndarray
    item_is_head: np.ndarray
    item_attributes: dict[int, dict[str, str]]
    user_attributes: dict[int, dict[str, str]]
    filters: dict[str, int] = field(default_factory=dict)
    domain: str = ""

    def __post_init__(self) -> None:
        self.user_ids = {t: i for i, t in enumerate(self.user_tokens) if i}
        self.item_ids = {t: i for i, t in enumerate(self.item_tokens) if i}
        self.train = [s[:-2] for s in self.sequences]
        self.valid_items = np.array([0] + [s[-2] for s in self.sequences[1:]], dtype=np.int64)
        self.test_items = np.array([0] + [s[-1] for s in self.sequences[1:]], dtype=np.int64)

    @property
    def num_interactions(self) -> int:
        """Interactions kept after filtering (train, validation and test together)."""
        return int(sum(len(s) for s in self.sequences))


def head_threshold(values: np.ndarray, fraction: float) -> int:
    """The smallest value among the top ``ceil(fraction * n)`` of ``values``.

    Values at or above it are "head": at least ``fraction`` of the entries are head, and fewer than
    ``fraction`` lie strictly above the threshold (ties at the threshold all count as head).
    """
    if len(values) == 0:
        raise ValueError("head_threshold needs at least one value")
    count = max(1, math.ceil(fraction * len(values) - 1e-9))
    return int(np.sort(values)[::-1][count - 1])


def _core_filter(users: np.ndarray, items: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Mask of interactions kept once every user has >= min_user and every item >= min_item of them."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_counts = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
        item_counts = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
        new = keep & (user_counts[users] >= min_user) & (item_counts[items] >= min_item)
        if new.sum() == keep.sum():
            return new
        keep = new


def preprocess(
    raw: RawDataset, *, k_core: int = 0, min_user_interactions: int = 3, head_fraction: float = 0.2
) -> Dataset:
    """Filter, remap, split and mark head / tail, as docs/design.md section 7 describes.

    Args:
        raw: the loaded dataset.
        k_core: when > 0, repeatedly drop users and items with fewer than ``k_core`` interactions until
            none is left (the result is a k-core).
        min_user_interactions: users with fewer interactions are dropped (within the same fixed point as
            the k-core, so both hold at the end). At least 3, as leave-one-out needs a training item.
        head_fraction: the top fraction of users (by training-history length) and items (by training
            popularity) that form the head groups, in (0, 1].

    Raises:
        ValueError: bad settings, or no interactions left after filtering (the message names the filters
            and what there was before).
    """
    if k_core < 0:
        raise ValueError(f"k_core must be >= 0, got {k_core}")
    if min_user_interactions < 3:
        raise ValueError(
            f"min_user_interactions must be >= 3 (leave-one-out needs test, validation and one training item), "
            f"got {min_user_interactions}"
        )
    if not 0 < head_fraction <= 1:
        raise ValueError(f"head_fraction must be in (0, 1], got {head_fraction}")

    user_tokens_raw, user_codes = np.unique(raw.users.astype(str), return_inverse=True)
    item_tokens_raw, item_codes = np.unique(raw.items.astype(str), return_inverse=True)
    user_codes, item_codes = user_codes.reshape(-1), item_codes.reshape(-1)
    times = np.asarray(raw.timestamps, dtype=np.float64)

    keep = _core_filter(user_codes, item_codes, max(k_core, min_user_interactions), max(k_core, 1))
    if not keep.any():
        raise ValueError(
            f"dataset {raw.name!r} is empty after filtering (k_core={k_core}, "
            f"min_user_interactions={min_user_interactions}): it had {len(raw)} interactions of "
            f"{len(user_tokens_raw)} users and {len(item_tokens_raw)} items, none left"
        )
    kept = np.flatnonzero(keep)  # file positions, ascending

    # Ids in order of first appearance in the file; 0 stays padding.
    def remap(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        unique, first = np.unique(codes, return_index=True)
        order = unique[np.argsort(first, kind="stable")]
        new_id = np.zeros(codes.max() + 1, dtype=np.int64)
        new_id[order] = np.arange(1, len(order) + 1)
        return new_id[codes], order

    users, user_order = remap(user_codes[kept])
    items, item_order = remap(item_codes[kept])
    times = times[kept]
    num_users, num_items = len(user_order), len(item_order)

    # Sort by (user, time); lexsort is stable, so ties keep the file order.
    order = np.lexsort((times, users))
    users, items, times = users[order], items[order], times[order]
    bounds = np.searchsorted(users, np.arange(1, num_users + 2))
    empty_items, empty_times = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
    sequences = [empty_items] + [items[bounds[u - 1] : bounds[u]] for u in range(1, num_users + 1)]
    stamps = [empty_times] + [times[bounds[u - 1] : bounds[u]] for u in range(1, num_users + 1)]
    train = [s[:-2] for s in sequences]

    train_lengths = np.array([len(t) for t in train[1:]], dtype=np.int64)
    all_train = np.concatenate(train[1:]) if num_users else empty_items
    popularity = np.bincount(all_train, minlength=num_items + 1).astype(np.int64)
    popularity[0] = 0
    user_threshold = head_threshold(train_lengths, head_fraction)
    item_threshold = head_threshold(popularity[1:], head_fraction)
    user_is_head = np.concatenate([[False], train_lengths >= user_threshold])
    item_is_head = np.concatenate([[False], popularity[1:] >= item_threshold])

    user_tokens = [""] + [str(t) for t in user_tokens_raw[user_order]]
    item_tokens = [""] + [str(t) for t in item_tokens_raw[item_order]]
    return Dataset(
        name=raw.name,
        num_users=num_users,
        num_items=num_items,
        user_tokens=user_tokens,
        item_tokens=item_tokens,
        sequences=sequences,
        timestamps=stamps,
        item_popularity=popularity,
        head_fraction=head_fraction,
        head_user_threshold=user_threshold,
        head_item_threshold=item_threshold,
        user_is_head=user_is_head.astype(bool),
        item_is_head=item_is_head.astype(bool),
        item_attributes={i: dict(raw.item_attributes.get(t, {})) for i, t in enumerate(item_tokens) if i},
        user_attributes={u: dict(raw.user_attributes.get(t, {})) for u, t in enumerate(user_tokens) if u},
        filters={"k_core": k_core, "min_user_interactions": min_user_interactions},
        domain=raw.domain,
    )


def statistics(dataset: Dataset) -> dict[str, float | int | str]:
    """Counts of a preprocessed dataset: the columns of the paper's Table 1 plus the head / tail split."""
    n = dataset.num_interactions
    return {
        "dataset": dataset.name,
        "users": dataset.num_users,
        "items": dataset.num_items,
        "interactions": n,
        "avg_length": n / dataset.num_users,
        "density": n / (dataset.num_users * dataset.num_items),
        "head_fraction": dataset.head_fraction,
        "head_user_threshold": dataset.head_user_threshold,
        "head_users": int(dataset.user_is_head.sum()),
        "head_item_threshold": dataset.head_item_threshold,
        "head_items": int(dataset.item_is_head.sum()),
    }


def statistics_table(dataset: Dataset) -> str:
    """A markdown table of :func:`statistics`, like the paper's Table 1, with the head / tail thresholds."""
    s = statistics(dataset)
    pct = f"{s['head_fraction']:.0%}"
    header = ["Dataset", "#Users", "#Items", "#Interactions", "Avg. length", "Density",
              f"Head users (top {pct})", f"Head items (top {pct})"]  # fmt: skip
    row = [
        str(s["dataset"]),
        f"{s['users']:,}",
        f"{s['items']:,}",
        f"{s['interactions']:,}",
        f"{s['avg_length']:.2f}",
        f"{s['density']:.4%}",
        f"{s['head_users']:,} (train length ≥ {s['head_user_threshold']})",
        f"{s['head_items']:,} (train popularity ≥ {s['head_item_threshold']})",
    ]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(row) + " |"])
