"""Plain-PyTorch reference of ``grasp.ops.score_topk``: the ground truth of its kernels (docs/design.md section 11).

It walks the users in blocks and the items in chunks, so the ``[B, M]`` score matrix never exists as a whole
(one block is ``[users, chunk]``, and ``[users, chunk, e]`` for the gated form's GELU input). Each chunk's
scores, with excluded rows at -inf, are merged into a running top-k ordered by (score desc, index asc); at
the end a slot still at -inf is empty: index -1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from grasp.ops._topk_neighbor_mean_reference import order_by_score

__all__ = ["Gated", "block_scores", "score_topk_reference"]

#: Elements of the temporaries of one (user block, item chunk) step (4 Mi values, 16 MiB in float32): larger
#: blocks leave the caches and run slower.
BLOCK_ELEMENTS = 1 << 22


class Gated(NamedTuple):
    """The user-conditioned part of the score (the GRASP enhancer folded, docs/design.md section 11).

    ``user``, ``user_sim``: ``[B, c]``; ``item``, ``item_sim``: ``[M, c]``; ``values``: ``[M, 3, e]``;
    ``bias``: ``[e]``; ``out_query``: ``[B, e]``. The term added to ``<query[b], table[j]>`` is
    ``<out_query[b], gelu(h[b, j])>`` with ``h[b, j] = sigmoid(s1/√c) values[j,0] + sigmoid(s2/√c) values[j,1]
    + sigmoid((s1+s2)/√(2c)) values[j,2] + bias``, ``s1 = <user[b], item[j]>``, ``s2 = <user_sim[b], item_sim[j]>``.
    """

    user: Tensor
    user_sim: Tensor
    item: Tensor
    item_sim: Tensor
    values: Tensor
    bias: Tensor
    out_query: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scores are computed in: float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_scores(query: Tensor, table: Tensor, gated: Gated | None, users: slice, items: slice) -> Tensor:
    """Scores ``[users, items]`` of one block, in the inputs' dtype (convert them first to compute in another)."""
    s = query[users] @ table[items].T
    if gated is None:
        return s
    c = gated.user.shape[1]
    s1 = gated.user[users] @ gated.item[items].T
    s2 = gated.user_sim[users] @ gated.item_sim[items].T
    gates = torch.sigmoid(torch.stack([s1 / math.sqrt(c), s2 / math.sqrt(c), (s1 + s2) / math.sqrt(2 * c)]))
    values = gated.values[items]
    h = torch.addcmul(gated.bias, gates[0].unsqueeze(-1), values[:, 0])  # [users, chunk, e]
    h.addcmul_(gates[1].unsqueeze(-1), values[:, 1]).addcmul_(gates[2].unsqueeze(-1), values[:, 2])
    return s + torch.einsum("bje,be->bj", F.gelu(h), gated.out_query[users])


def _best(scores: Tensor, start: int, k: int) -> tuple[Tensor, Tensor]:
    """The top ``min(k, chunk)`` of each row of a chunk whose first column is item ``start``, in result order.

    ``topk`` finds each row's k-th value; every larger score is taken, and of the scores equal to it the
    ones with the smallest columns until there are k. No data-dependent branch, so torch.compile traces it.
    """
    width = scores.shape[1]
    k = min(k, width)
    kth = scores.topk(k, dim=1).values[:, -1:]
    greater, equal = scores > kth, scores == kth
    wanted = k - greater.sum(1, keepdim=True)
    take = greater | (equal & (equal.cumsum(1) <= wanted))
    columns = torch.arange(width, device=scores.device).expand_as(scores)
    index = torch.where(take, columns, width).topk(k, dim=1, largest=False).values
    best, index = order_by_score(scores.gather(1, index), index)
    return best, index + start


def score_topk_reference(
    query: Tensor,
    table: Tensor,
    k: int,
    *,
    exclude: Tensor | None = None,
    gated: Gated | None = None,
    upcast: bool = True,
    block_elements: int = BLOCK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Each user's k best rows of ``table`` by score, excluded rows left out (arguments as ``score_topk``'s).

    ``upcast`` computes in :func:`accumulation_dtype` (the op's contract); ``False`` computes in the inputs'
    dtype, the "same-dtype torch" yardstick of the kernel tolerance tests.

    Returns:
        scores ``[B, k]`` in the computing dtype, descending, equal scores ordered by the smaller index, and
        int64 indices ``[B, k]``; slots beyond the rows that remain hold (-inf, -1). A row whose score is not
        above -inf (NaN, or -inf after an overflow) is left out like an excluded one.
    """
    dtype = accumulation_dtype(query.dtype) if upcast else query.dtype
    query, table = query.to(dtype), table.to(dtype)
    if gated is not None:
        gated = Gated(*(t.to(dtype) for t in gated))
    B, M = query.shape[0], table.shape[0]
    # A block holds [users, chunk] scores, or [users, chunk, e] GELU inputs: every user, unless that leaves
    # fewer than 64 items per chunk.
    per_pair = gated.values.shape[2] if gated is not None else 1
    users = min(max(B, 1), max(1, block_elements // (per_pair * min(M, 64))))
    chunk = max(1, block_elements // (users * per_pair))
    scores = torch.full((B, k), float("-inf"), dtype=dtype, device=query.device)
    indices = torch.full((B, k), -1, dtype=torch.int64, device=query.device)
    for u0 in range(0, B, users):
        rows = slice(u0, min(B, u0 + users))
        best = scores[rows, :0]
        best_index = indices[rows, :0]
        for j0 in range(0, M, chunk):
            j1 = min(M, j0 + chunk)
            s = block_scores(query, table, gated, rows, slice(j0, j1))
            dead = ~(s > float("-inf"))
            if exclude is not None:
                ex = exclude[rows]
                # Excluded rows of this chunk, every other entry sent to a spare last column.
                column = torch.where((ex >= j0) & (ex < j1), ex - j0, j1 - j0)
                hit = torch.zeros(s.shape[0], j1 - j0 + 1, dtype=torch.bool, device=s.device)
                dead |= hit.scatter_(1, column, True)[:, :-1]
            s = s.masked_fill(dead, float("-inf"))
            cand, cand_index = _best(s, j0, k)
            best, best_index = order_by_score(torch.cat([best, cand], 1), torch.cat([best_index, cand_index], 1))
            best, best_index = best[:, :k], best_index[:, :k]
        scores[rows], indices[rows] = best, best_index.masked_fill(~(best > float("-inf")), -1)
    return scores, indices
