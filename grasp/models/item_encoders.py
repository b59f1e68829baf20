"""Item encoders: how each model turns an item id (for a given user) into the vector a backbone consumes.

The same vector is used as the backbone's input at a position and to score that item as a candidate.

* :class:`IdEncoder` (models ``id`` and ``llminit``): a trainable ``nn.Embedding(num_items + 2, d)``; row 0
  is padding (zeros), row ``num_items + 1`` the BERT4Rec mask token. ``llminit`` initialises it with
  :func:`pca_embedding` of the LLM item embeddings.
* :class:`GraspEncoder` (model ``grasp``, docs/design.md section 6): ``id_embedding(item) + enhancer(user, item)``,
  the enhancer being a :class:`grasp.nn.HolisticAttention` block.
* :class:`DualViewEncoder` (model ``llmesr``): LLM-ESR's two views side by side, ``[id | adapter(I)]``.

An encoder is called as ``encoder(users [B], items [B, L]) -> [B, L, width]``; ``width = views * d``, and a
multi-view encoder's views are run through the backbone separately (see :mod:`grasp.models.recommender`).
``encoder.score_all(users, state)`` scores every item 0..num_items for the user states ``state [B, width]``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from grasp.nn import HolisticAttention
from grasp.ops import score_topk

__all__ = [
    "IdEncoder",
    "GraspEncoder",
    "DualViewEncoder",
    "pca_embedding",
    "pca_adapters",
    "embedding_std",
]

#: Elements of one ``[B, chunk, 4d]`` (unfused) or ``[B, chunk, d]`` (fused) block in
#: :meth:`GraspEncoder.score_all` (bounds its memory).
_CHUNK_ELEMENTS = 1 << 22


def embedding_std(d: int) -> float:
    """Init std of ID embeddings: ``d ** -0.5``, so an embedding has norm about 1."""
    return d**-0.5


def _frozen(array: np.ndarray, extra_rows: int = 0) -> Tensor:
    """float32 copy of a frozen table, with ``extra_rows`` zero rows appended."""
    table = torch.as_tensor(np.asarray(array, dtype=np.float32))
    if extra_rows:
        table = torch.cat([table, table.new_zeros(extra_rows, table.shape[1])])
    return table.contiguous()


def _adapt_distinct(adapter: nn.Module, tables: tuple[Tensor, ...], ids: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """``adapter(table[distinct ids])`` for each table, and the flat index of every id into those rows.

    When there are at least as many ids as table rows (a training batch of a small catalogue), the adapter
    runs over the whole tables instead: about the same rows, without sorting the ids.
    """
    if ids.numel() >= len(tables[0]):
        return adapter(torch.cat(tables)).chunk(len(tables)), ids.reshape(-1)
    unique, inverse = torch.unique(ids, return_inverse=True)
    adapted = adapter(torch.cat([t[unique] for t in tables]))
    return adapted.chunk(len(tables)), inverse.reshape(-1)


def _gather_adapted(adapter: nn.Module, tables: tuple[Tensor, ...], ids: Tensor) -> tuple[Tensor, ...]:
    """``adapter(table[ids])`` for each table, running the adapter once per distinct id."""
    adapted, flat = _adapt_distinct(adapter, tables, ids)
    # index_select's backward (index_add) is faster than advanced indexing's
    return tuple(a.index_select(0, flat).view(*ids.shape, a.shape[-1]) for a in adapted)


def pca_embedding(item: np.ndarray, d: int, std: float) -> Tensor:
    """Project the LLM item embeddings (rows 1..n of ``item``) onto their top-``d`` principal components.

    Exact PCA through the eigendecomposition of the smaller Gram matrix (``D x D`` or ``n x n``, float64).
    The projection is rescaled so its entries have standard deviation ``std`` (the ID-embedding init
    scale). When ``min(n, D) < d`` the remaining columns are random ``N(0, std^2)``. Returns
    ``[n + 1, d]`` float32 with a zero row 0.
    """
    x = torch.as_tensor(np.asarray(item[1:], dtype=np.float32))
    x = x - x.mean(0)
    n, dim = x.shape
    k = min(d, n, dim)
    if dim <= n:
        _, vectors = torch.linalg.eigh((x.T @ x).double())
        z = x @ vectors[:, -k:].flip(1).float()
    else:
        values, vectors = torch.linalg.eigh((x @ x.T).double())
        z = (vectors[:, -k:] * values[-k:].clamp(min=0).sqrt()).flip(1).float()
    z = z * (std / z.std().clamp(min=1e-12))
    if k < d:
        z = torch.cat([z, torch.randn(n, d - k) * std], 1)
    return torch.cat([z.new_zeros(1, d), z])


def pca_adapters(enhancer: HolisticAttention, user: np.ndarray, item: np.ndarray) -> None:
    """Start GRASP's user and item adapters as one linear map of the LLM space (``--adapter-init pca``).

    Both adapters compute ``c (x - mean) P^T`` (:meth:`grasp.nn.Adapter.init_linear`), ``P`` the top-``d``
    principal directions of the user and item LLM embeddings (rows 1..n of ``user`` and ``item``) together, so
    a gate logit ``<u, i> / sqrt(d)`` starts as a scaled dot product of the two LLM vectors in that subspace:
    ordered as the LLM similarity of user and item, which tells right context from wrong (README: the gates of
    adapters trained from PyTorch's default start do not). The item scale gives the adapted items (the gated
    values) an RMS norm of 1, the norm of an ID embedding; the user scale gives the self-branch logits a
    standard deviation of 1 over independent (user, item) pairs. Columns past the data's rank start at zero.
    """
    if user.shape[1] != item.shape[1]:
        raise ValueError(
            "adapter_init 'pca' needs user and item LLM embeddings of one width, "
            f"got {user.shape[1]} and {item.shape[1]}"
        )
    tables = (user, item)
    count = sum(len(t) - 1 for t in tables)
    mean = sum(chunk.sum(0) for t in tables for chunk in _rows_float64(t)) / count
    scatter = sum(_gram(chunk - mean) for t in tables for chunk in _rows_float64(t))
    _, vectors = torch.linalg.eigh(scatter)
    d = enhancer.d
    k = min(d, count, len(mean))
    basis = torch.zeros(d, len(mean), dtype=torch.float64)
    basis[:k] = vectors[:, -k:].flip(1).T
    # Per table, over its projected rows z = (x - mean) P^T: the mean of z and the second moment E[z z^T].
    moments = []
    for t in tables:
        total, second = torch.zeros(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        for chunk in _rows_float64(t):
            z = (chunk - mean) @ basis.T
            total, second = total + z.sum(0), second + _gram(z)
        moments.append((total / (len(t) - 1), second / (len(t) - 1)))
    (mean_user, second_user), (mean_item, second_item) = moments
    item_scale = 1 / second_item.trace().clamp(min=1e-24).sqrt()
    # Var <z_u, z_i> over independent pairs: E[<z_u, z_i>^2] - E[<z_u, z_i>]^2 = tr(S_u S_i) - <m_u, m_i>^2.
    variance = (second_user * second_item).sum() - mean_user.dot(mean_item).square()
    user_scale = d**0.5 / (item_scale * variance.clamp(min=1e-24).sqrt())
    for adapter, scale in ((enhancer.user_adapter, user_scale), (enhancer.item_adapter, item_scale)):
        weight = scale * basis
        adapter.init_linear(weight.float(), (-weight @ mean).float())


def _rows_float64(table: np.ndarray, chunk: int = 1 << 14) -> Iterator[Tensor]:
    """Rows 1..n of a frozen table as float64 tensors of at most ``chunk`` rows (bounds the memory of a pass)."""
    for start in range(1, len(table), chunk):
        yield torch.as_tensor(np.asarray(table[start : start + chunk], dtype=np.float64))


def _gram(x: Tensor) -> Tensor:
    return x.T @ x


class IdEncoder(nn.Module):
    """Trainable item ID embeddings ``[num_items + 2, d]`` (0 = padding, ``num_items + 1`` = mask token).

    Args:
        num_items: catalogue size.
        d: embedding width.
        init: optional ``[num_items + 1, d]`` initial rows 0..num_items (LLMInit); N(0, d^-1) otherwise.
    """

    views = 1
    #: Whether an item's vector is independent of the other items in the call (lets the loss encode the
    #: inputs, targets and negatives in one pass).
    pointwise = True
    #: Whether an item's vector depends on the user (then there is no single item table to score against).
    user_conditioned = False

    def __init__(self, num_items: int, d: int, *, init: Tensor | None = None) -> None:
        super().__init__()
        self.num_items = num_items
        self.d = d
        self.embedding = nn.Embedding(num_items + 2, d, padding_idx=0)
        with torch.no_grad():
            self.embedding.weight.normal_(std=embedding_std(d))
            if init is not None:
                self.embedding.weight[: num_items + 1] = init
            self.embedding.weight[0] = 0

    @property
    def width(self) -> int:
        """Width of the item vectors."""
        return self.views * self.d

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B, L] -> [B, L, d]`` (users are ignored: the representation is user-independent)."""
        return self.embedding(items)

    def item_table(self) -> Tensor:
        """``[num_items + 1, width]`` vectors of items 0..num_items."""
        return self.embedding.weight[: self.num_items + 1]

    def score_all(self, users: Tensor, state: Tensor) -> Tensor:
        """``<state[b], e(item)>`` for every item 0..num_items: ``[B, num_items + 1]``."""
        return state @ self.item_table().T

    def topk(self, users: Tensor, state: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The ``k`` best items of ``1..num_items`` for each user state, by :func:`grasp.ops.score_topk` (no
        ``[B, num_items]`` score matrix).

        Args:
            users: ``[B]`` user ids; state: ``[B, width]`` user states.
            exclude: optional int64 ``[B, X]`` item ids never returned (0 entries are ignored).

        Returns:
            ``(scores float32 [B, k], items int64 [B, k])``, best first, equal scores by the smaller item id;
            where fewer than k items remain, the tail is ``-inf`` / 0.
        """
        return _items_of_rows(*score_topk(state, self.item_table()[1:], k, exclude=_rows_of_items(exclude)))


def _rows_of_items(exclude: Tensor | None) -> Tensor | None:
    """Item ids (0 = none) as rows of the item tables without padding (-1 = none)."""
    return None if exclude is None else exclude.to(torch.int64) - 1


def _items_of_rows(scores: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``(scores, item ids)`` of ``score_topk``'s rows (its -1 filler becomes item 0)."""
    return scores, rows + 1


class GraspEncoder(IdEncoder):
    """GRASP item representation ``id_embedding(item) + enhancer(user, item)`` (user-conditioned).

    The enhancer is a :class:`grasp.nn.HolisticAttention` block fed from frozen LLM tables: buffers ``U, Ū``
    ``[num_users + 1, D]`` and ``I, Ī`` ``[num_items + 2, D]`` (a zero row is appended for the mask token), not
    part of ``parameters()`` nor of the state dict (they are rebuilt from the tables). The adapted user is
    broadcast over the positions. Positions that are padding (0) or the mask token get a zero enhancement.

    Under the softmax ablation the op normalises the gates over the L positions of one row, so (1) in a
    history window every position's gate depends on the whole window, later items included (a causal backbone
    then sees a normaliser that mixes in future items, the target among them); (2) when scoring, the row is
    the candidate list, so a candidate's score depends on the other candidates; :meth:`score_all` normalises
    over the whole catalogue (equal to scoring all items as one candidate list), so sampled and full-ranking
    scores differ under softmax.
    """

    user_conditioned = True

    def __init__(
        self,
        num_items: int,
        d: int,
        enhancer: HolisticAttention,
        tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        *,
        init: Tensor | None = None,
    ) -> None:
        super().__init__(num_items, d, init=init)
        user, user_sim, item, item_sim = tables
        self.register_buffer("user", _frozen(user), persistent=False)
        self.register_buffer("user_sim", _frozen(user_sim), persistent=False)
        self.register_buffer("item", _frozen(item, 1), persistent=False)
        self.register_buffer("item_sim", _frozen(item_sim, 1), persistent=False)
        self.enhancer = enhancer
        self.pointwise = enhancer.pointwise

    def adapt_users(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(u, ū)`` of user ids ``[B]``, each ``[B, d]``."""
        return self.enhancer.adapt_users(self.user[users], self.user_sim[users])

    def adapt_items(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(i, ī)`` of item ids, each ``[*items.shape, d]`` (the adapter runs once per distinct item)."""
        return _gather_adapted(self.enhancer.item_adapter, (self.item, self.item_sim), items)

    def enhance(self, users: Tensor, items: Tensor) -> Tensor:
        """The enhancement ``[B, L, d]`` of items ``[B, L]`` for users ``[B]``; zero at padding and mask tokens.

        With pointwise gates (sigmoid, or no attention) only the real positions go through the block, as
        (user, item) pairs, so the cost follows the number of real items, not the padded window (most of a
        window is padding when histories are shorter than ``max_len``).
        """
        mask = (items > 0) & (items <= self.num_items)
        u, u_sim = self.adapt_users(users)
        if not self.pointwise:
            i, i_sim = self.adapt_items(items)
            return self.enhancer.combine(u, u_sim, i, i_sim, mask)
        rows, cols = mask.nonzero(as_tuple=True)
        (i, i_sim), inverse = _adapt_distinct(self.enhancer.item_adapter, (self.item, self.item_sim), items[rows, cols])
        packed = self.enhancer.pairs(u, u_sim, i, i_sim, rows, inverse)
        out = packed.new_zeros(*items.shape, self.enhancer.d)
        return out.index_put((rows, cols), packed)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B] x [B, L] -> [B, L, d]``."""
        return self.embedding(items) + self.enhance(users, items)

    def score_all(self, users: Tensor, state: Tensor) -> Tensor:
        """Every item's score with its user-conditioned representation, ``[B, num_items + 1]``.

        The enhancement runs over items in chunks whose ``[B, chunk, 4d]`` (unfused) or ``[B, chunk, d]``
        (fused) block stays within :data:`_CHUNK_ELEMENTS`.
        """
        scores = super().score_all(users, state)
        enhancer, batch = self.enhancer, len(users)
        u, u_sim = self.adapt_users(users)
        i_all, i_sim_all = self.adapt_items(torch.arange(1, self.num_items + 1, device=users.device))
        row_lse = None if self.pointwise else enhancer.row_lse(u, u_sim, i_all, i_sim_all)
        fused = enhancer.fused(users.device)
        chunk = max(1, _CHUNK_ELEMENTS // (batch * (1 if fused else 4) * enhancer.d))
        for lo in range(0, self.num_items, chunk):
            i, i_sim = i_all[lo : lo + chunk], i_sim_all[lo : lo + chunk]
            width = len(i)
            if fused:
                rows = torch.arange(batch, device=users.device).repeat_interleave(width)
                cols = torch.arange(width, device=users.device).repeat(batch)
                rep = enhancer.pairs(u, u_sim, i, i_sim, rows, cols).view(batch, width, enhancer.d)
            else:
                i, i_sim = (t[None].expand(batch, -1, -1) for t in (i, i_sim))
                rep = enhancer.combine(u, u_sim, i, i_sim, None, row_lse)
            scores[:, 1 + lo : 1 + lo + width] += torch.bmm(rep, state.unsqueeze(-1)).squeeze(-1)
        return scores

    def topk(self, users: Tensor, state: Tensor, k: int, exclude: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`IdEncoder.topk` with the user-conditioned item vectors.

        With sigmoid gates the enhancer folds into :func:`grasp.ops.score_topk`'s gated form (see
        :meth:`grasp.nn.HolisticAttention.score_terms`): no ``[B, num_items]`` scores nor ``[B, num_items, d]``
        vectors. The softmax and no-attention ablations score the catalogue with :meth:`score_all` (memory
        ``B x num_items``) and take the top k of that.
        """
        enhancer = self.enhancer
        if not (enhancer.attention and enhancer.activation == "sigmoid"):
            return _topk_of_scores(self.score_all(users, state)[:, 1:], k, _rows_of_items(exclude))
        u, u_sim = self.adapt_users(users)
        i, i_sim = self.adapt_items(torch.arange(1, self.num_items + 1, device=users.device))
        gated, offset = enhancer.score_terms(u, u_sim, i, i_sim, state)
        table = self.embedding.weight[1 : self.num_items + 1]
        scores, rows = score_topk(state, table, k, exclude=_rows_of_items(exclude), gated=gated)
        return _items_of_rows(scores + offset.unsqueeze(1).float(), rows)


def _topk_of_scores(scores: Tensor, k: int, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """:meth:`IdEncoder.topk` from a full score matrix ``[B, M]`` of rows (items 1..M)."""
    scores = scores.float().clone()
    if exclude is not None:
        keep = exclude >= 0
        rows = torch.arange(len(scores), device=scores.device).unsqueeze(1).expand_as(exclude)
        scores[rows[keep], exclude[keep]] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    top, rows = order.values[:, :k], order.indices[:, :k]
    rows = torch.where(torch.isneginf(top), -1, rows)
    return _items_of_rows(top, rows)


class DualViewEncoder(IdEncoder):
    """LLM-ESR's dual-view item vectors ``[collaborative | semantic]`` of width ``2d``.

    Collaborative view: trainable ID embeddings, initialised from the PCA of the LLM item embeddings (LLM-ESR
    does the same). Semantic view: the frozen LLM embeddings ``I`` (a buffer, a zero row for the mask token
    as in LLM-ESR) through a trainable two-layer linear adapter ``D -> D/2 -> d``. Padding gives zeros.
    """

    views = 2

    def __init__(self, num_items: int, d: int, item: np.ndarray, *, init: Tensor) -> None:
        super().__init__(num_items, d, init=init)
        self.register_buffer("item", _frozen(item, 1), persistent=False)
        hidden = max(d, item.shape[1] // 2)
        self.adapter = nn.Sequential(nn.Linear(item.shape[1], hidden), nn.Linear(hidden, d))

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B, L] -> [B, L, 2d]``."""
        (semantic,) = _gather_adapted(self.adapter, (self.item,), items)
        return torch.cat([self.embedding(items), semantic * (items > 0).unsqueeze(-1)], -1)

    def item_table(self) -> Tensor:
        """``[num_items + 1, 2d]`` vectors of items 0..num_items (row 0 zeros)."""
        semantic = self.adapter(self.item[: self.num_items + 1])
        semantic = torch.cat([semantic.new_zeros(1, self.d), semantic[1:]])
        return torch.cat([self.embedding.weight[: self.num_items + 1], semantic], -1)
