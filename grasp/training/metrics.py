"""Ranking metrics from raw ranks: NDCG@k and HR@k in percent, overall and per head / tail group.

A rank is 0-based: the number of candidates that score at least as high as the target (ties count
against the target). ``HR@k`` is the percentage of users whose target ranks below ``k``;
``NDCG@k`` averages ``1 / log2(rank + 2)`` over those users (0 for the others), times 100.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KS", "GROUPS", "ranking_metrics", "group_metrics", "group_masks"]

#: The cut-offs reported (docs/design.md section 7).
KS = (1, 3, 5, 10, 20)
#: Metric groups, in report order.
GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float] | None:
    """``{"NDCG@k": ..., "HR@k": ...}`` in percent for 0-based ``ranks``; ``None`` when there are no ranks."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {ranks.shape}")
    if len(ranks) == 0:
        return None
    if (ranks < 0).any():
        raise ValueError(f"ranks must be >= 0, got {int(ranks.min())}")
    gain = 1.0 / np.log2(ranks.astype(np.float64) + 2.0)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"NDCG@{k}"] = float(100.0 * np.where(hit, gain, 0.0).mean())
        out[f"HR@{k}"] = float(100.0 * hit.mean())
    return out


def group_masks(
    users: np.ndarray, targets: np.ndarray, user_is_head: np.ndarray, item_is_head: np.ndarray
) -> dict[str, np.ndarray]:
    """Boolean masks over the evaluated rows for each of :data:`GROUPS` (item groups by the target item)."""
    head_user = np.asarray(user_is_head, dtype=bool)[users]
    head_item = np.asarray(item_is_head, dtype=bool)[targets]
    return {
        "overall": np.ones(len(users), dtype=bool),
        "tail_user": ~head_user,
        "head_user": head_user,
        "tail_item": ~head_item,
        "head_item": head_item,
    }


def group_metrics(
    ranks: np.ndarray,
    users: np.ndarray,
    targets: np.ndarray,
    user_is_head: np.ndarray,
    item_is_head: np.ndarray,
    ks: tuple[int, ...] = KS,
) -> tuple[dict[str, dict[str, float] | None], dict[str, int]]:
    """Metrics per group and the group sizes.

    Args:
        ranks: 0-based rank of each evaluated user's target.
        users, targets: the user id and target item id of each rank.
        user_is_head, item_is_head: the dataset's head flags, indexed by id.

    Returns:
        ``({group: metrics or None if the group is empty}, {group: number of users})``.
    """
    ranks, users, targets = np.asarray(ranks), np.asarray(users), np.asarray(targets)
    if not len(ranks) == len(users) == len(targets):
        raise ValueError(f"ranks, users and targets must have equal lengths, got {len(ranks)}, {len(users)}, "
                         f"{len(targets)}")  # fmt: skip
    masks = group_masks(users, targets, user_is_head, item_is_head)
    return (
        {g: ranking_metrics(ranks[m], ks) for g, m in masks.items()},
        {g: int(m.sum()) for g, m in masks.items()},
    )
