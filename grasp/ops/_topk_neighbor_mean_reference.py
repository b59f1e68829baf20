"""Plain-PyTorch reference of the top-k neighbour search and gather-mean (docs/design.md section 4).

It processes the queries in blocks, so the q x n similarity matrix never exists
as a whole (a block is ``block x n``), and it is the ground truth of the kernels:
fp32 dot products, neighbours in descending order of similarity, ties broken by
the smaller index, and a row's own index excluded when asked.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Elements of one ``block x n`` similarity block of the reference (64 Mi floats = 256 MiB).
BLOCK_ELEMENTS = 1 << 26


def order_by_score(scores: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by (score desc, index asc): sort by index, then stable-sort by score."""
    idx, order = idx.sort(dim=1)
    scores = scores.gather(1, order)
    scores, order = scores.sort(dim=1, descending=True, stable=True)
    return scores, idx.gather(1, order)


def drop_own(scores: Tensor, idx: Tensor, own: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """From k+1 ordered neighbours per row, drop the row's own index ``own[r]``, else the last one."""
    is_self = idx == own.unsqueeze(1)
    last = torch.full_like(own, idx.shape[1] - 1)
    drop = torch.where(is_self.any(dim=1), is_self.float().argmax(dim=1), last)
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[torch.arange(idx.shape[0], device=idx.device), drop] = False
    return scores[keep].view(-1, k), idx[keep].view(-1, k)


def select_topk(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row of ``sims`` in descending order, equal values ordered by the smaller column."""
    n = sims.shape[1]
    width = min(n, 2 * k + 8)
    vals, idx = order_by_score(*sims.topk(width, dim=1))
    # If the k-th value also sits at the end of the candidate window, equal values outside the
    # window may carry smaller indices: redo those rows with a full stable sort.
    unsure = (vals[:, k - 1] == vals[:, width - 1]) if width < n else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    if unsure.any():
        rows = unsure.nonzero().squeeze(1)
        full_vals, full_idx = sims[rows].sort(dim=1, descending=True, stable=True)
        vals[rows, :k] = full_vals[:, :k]
        idx[rows, :k] = full_idx[:, :k]
    return vals[:, :k], idx[:, :k]


def topk_neighbor_mean_search_reference(
    queries: Tensor,
    db: Tensor,
    k: int,
    *,
    query_start: int = 0,
    exclude_self: bool = True,
    block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact inner-product top-k of every query row against ``db`` in float32.

    Args:
        queries: ``[q, D]``; db: ``[n, D]`` (normalise both first for cosine similarity).
        k: neighbours per query.
        query_start: query row r is database row ``query_start + r`` (for self exclusion).
        exclude_self: never select database row ``query_start + r`` for query row r.
        block: queries per block (default: as many as fit ``BLOCK_ELEMENTS`` similarities).

    Returns:
        ``scores`` float32 ``[q, k]`` (descending) and ``indices`` int64 ``[q, k]``.
    """
    q, n = queries.shape[0], db.shape[0]
    block = block or max(1, min(q, BLOCK_ELEMENTS // max(n, 1)))
    db32 = db.float()
    scores = torch.empty(q, k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(q, k, dtype=torch.int64, device=queries.device)
    for start in range(0, q, block):
        stop = min(q, start + block)
        sims = queries[start:stop].float() @ db32.T
        if exclude_self:
            rows = torch.arange(stop - start, device=sims.device)
            cols = rows + (query_start + start)
            keep = cols < n
            sims[rows[keep], cols[keep]] = float("-inf")
        scores[start:stop], indices[start:stop] = select_topk(sims, k)
    return scores, indices


def topk_neighbor_mean_gather_reference(x: Tensor, indices: Tensor, *, block: int = 4096) -> Tensor:
    """``x[indices].mean(1)`` accumulated in float32 (float64 for float64), in x's dtype, by blocks."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.empty(indices.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    for start in range(0, indices.shape[0], block):
        rows = x[indices[start : start + block]].to(acc)
        out[start : start + block] = rows.mean(dim=1).to(x.dtype)
    return out
