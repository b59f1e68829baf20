"""Item encoders: how each model turns an item id (for a given user) into the vector a backbone consumes.

The same vector is used as the backbone's input at a position and to score that item as a candidate.

* :class:`IdEncoder` (models ``id`` and ``llminit``): a trainable ``nn.Embedding(num_items + 2, d)``; row 0
  is padding (zeros), row ``num_items + 1`` the BERT4Rec mask token. ``llminit`` initialises it with
  :func:`pca_embedding` of the LLM item embeddings.
* :class:`GraspEncoder` (model ``grasp``, docs/design.md section 6): ``id_embedding(item) + enhancer(user, item)``,
  the enhancer being :class:`GraspEnhancer`.
* :class:`DualViewEncoder` (model ``llmesr``): LLM-ESR's two views side by side, ``[id | adapter(I)]``.

An encoder is called as ``encoder(users [B], items [B, L]) -> [B, L, width]``; ``width = views * d``, and a
multi-view encoder's views are run through the backbone separately (see :mod:`grasp.models.recommender`).
``encoder.score_all(users, state)`` scores every item 0..num_items for the user states ``state [B, width]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from grasp.nn import Adapter
from grasp.ops import holistic_attention, holistic_attention_projected
from grasp.ops.holistic_attention_projected import has_kernel

__all__ = [
    "BRANCHES",
    "IdEncoder",
    "GraspEnhancer",
    "GraspEncoder",
    "DualViewEncoder",
    "pca_embedding",
    "embedding_std",
]

#: HAE output slices per branch, in units of d: self = [0:d], similar = [d:2d], global = [2d:4d].
BRANCHES = {"self": (0, 1), "similar": (1, 2), "global": (2, 4)}

#: Elements of one ``[B, chunk, 4d]`` (unfused) or ``[B, chunk, d]`` (fused) block in
#: :meth:`GraspEnhancer.score_all` (bounds its memory).
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


class GraspEnhancer(nn.Module):
    """GRASP's holistic attention enhancement of an item for a user (docs/design.md sections 2 and 6).

    Frozen, non-trainable buffers ``U, Ū`` ``[num_users + 1, D]`` and ``I, Ī`` ``[num_items + 2, D]``
    (a zero row is appended for the mask token) are not part of ``parameters()`` nor of the state dict:
    they are rebuilt from the tables. Trainable user and item :class:`grasp.nn.Adapter` ``D -> d`` (a
    vector and its neighbour mean share one adapter), the :func:`grasp.ops.holistic_attention` op with
    the adapted user broadcast over the positions, then an MLP ``width -> d -> d`` (GELU; dropout sits in the
    adapters, not here: the MLP runs once per position). Positions that are padding (0) or the mask token
    get a zero enhancement. With sigmoid gates the op and the MLP's first layer run fused, as
    :func:`grasp.ops.holistic_attention_projected` (the same function, the layer's projection applied once
    per distinct item instead of once per position) where that op has a kernel (see :meth:`fused`).

    Ablations:
        branches: the subset of ``("self", "similar", "global")`` whose output slices (``[0:d]``,
            ``[d:2d]``, ``[2d:4d]``) are kept; the MLP input is sized to match.
        activation: ``"sigmoid"`` (the paper) or ``"softmax"``. The op's softmax normalises the gates over
            the L positions of one row, so (1) in a history window every position's gate depends on the
            whole window, later items included (a causal backbone then sees a normaliser that mixes in
            future items, the target among them); (2) when scoring, the row is the candidate list, so a
            candidate's score depends on the other candidates; :meth:`score_all` normalises over the whole
            catalogue (equal to scoring all items as one candidate list), so sampled and full-ranking
            scores differ under softmax.
        attention: ``False`` drops the op and feeds the ungated concatenation ``[u, ū, i, ī]`` (4d) to the
            MLP (``--no-attention``; needs all branches and the sigmoid activation).
    """

    def __init__(
        self,
        user: np.ndarray,
        user_sim: np.ndarray,
        item: np.ndarray,
        item_sim: np.ndarray,
        d: int,
        *,
        dropout: float,
        branches: tuple[str, ...],
        activation: str,
        attention: bool,
        backend: str | None,
    ) -> None:
        super().__init__()
        self.num_items = len(item) - 1
        self.d = d
        self.activation = activation
        self.attention = attention
        self.backend = backend
        self.register_buffer("user", _frozen(user), persistent=False)
        self.register_buffer("user_sim", _frozen(user_sim), persistent=False)
        self.register_buffer("item", _frozen(item, 1), persistent=False)
        self.register_buffer("item_sim", _frozen(item_sim, 1), persistent=False)
        self.user_adapter = Adapter(user.shape[1], d, dropout=dropout)
        self.item_adapter = Adapter(item.shape[1], d, dropout=dropout)
        columns = [
            c for name in BRANCHES if name in branches for c in range(BRANCHES[name][0] * d, BRANCHES[name][1] * d)
        ]
        keep_all = not attention or len(columns) == 4 * d
        self.register_buffer("keep", None if keep_all else torch.tensor(columns), persistent=False)
        width = 4 * d if keep_all else len(columns)
        self.mlp = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))

    def adapt_users(self, users: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(u, ū)``, each ``[B, d]``."""
        return tuple(self.user_adapter(torch.stack([self.user[users], self.user_sim[users]])).unbind(0))

    def adapt_items(self, items: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted ``(i, ī)``, each ``[*items.shape, d]`` (the adapter runs once per distinct item)."""
        return _gather_adapted(self.item_adapter, (self.item, self.item_sim), items)

    def combine(
        self,
        u: Tensor,
        u_sim: Tensor,
        i: Tensor,
        i_sim: Tensor,
        mask: Tensor | None,
        row_lse: Tensor | None = None,
    ) -> Tensor:
        """Enhancement ``[B, L, d]`` from adapted users ``[B, d]`` (or one per position, ``[B, L, d]``) and
        items ``[B, L, d]``.

        ``row_lse`` (softmax only, ``[B, 3]``): log-sum-exp of each branch's logits over a longer row that
        ``i`` is a chunk of; the gates are then renormalised from the chunk to that row.
        """
        if not self.attention:
            if u.dim() == 2:
                u, u_sim = (t.unsqueeze(1).expand(-1, i.shape[1], -1) for t in (u, u_sim))
            fused = torch.cat([u, u_sim, i, i_sim], -1)
        else:
            fused = holistic_attention(u, u_sim, i, i_sim, mask=mask, activation=self.activation, backend=self.backend)
            if row_lse is not None:
                fused = fused * self._renormalise(u, u_sim, i, i_sim, row_lse)
            if self.keep is not None:
                fused = fused.index_select(-1, self.keep)
        out = self.mlp(fused)
        return out if mask is None else out * mask.unsqueeze(-1)

    def _gate_logits(self, s1: Tensor, s2: Tensor) -> Tensor:
        """The op's gate logits ``[..., 3]`` (self, similar, global) from ``s1 = <u, i>``, ``s2 = <ū, ī>``."""
        return torch.stack([s1 / math.sqrt(self.d), s2 / math.sqrt(self.d), (s1 + s2) / math.sqrt(2 * self.d)], -1)

    def _renormalise(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor, row_lse: Tensor) -> Tensor:
        """Per-branch factor ``[B, 1, 4d]`` turning softmax gates over the chunk ``i`` into gates over the row."""
        logits = self._gate_logits((i * u.unsqueeze(1)).sum(-1), (i_sim * u_sim.unsqueeze(1)).sum(-1))
        factor = torch.exp(logits.logsumexp(1) - row_lse)  # [B, 3]
        return factor[:, [0, 1, 2, 2]].repeat_interleave(self.d, dim=1).unsqueeze(1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B]`` users, ``[B, L]`` items -> ``[B, L, d]``; padding and mask-token positions give zeros.

        With pointwise gates (sigmoid, or no attention) only the real positions go through the op and the
        MLP, as (user, item) pairs, so the cost follows the number of real items, not the padded window
        (most of a window is padding when histories are shorter than ``max_len``).
        """
        mask = (items > 0) & (items <= self.num_items)
        u, u_sim = self.adapt_users(users)
        if self.activation == "softmax" and self.attention:
            i, i_sim = self.adapt_items(items)
            return self.combine(u, u_sim, i, i_sim, mask)
        rows, cols = mask.nonzero(as_tuple=True)
        if self.fused(items.device):
            (i, i_sim), inverse = _adapt_distinct(self.item_adapter, (self.item, self.item_sim), items[rows, cols])
            packed = self._fused(u, u_sim, i, i_sim, rows, inverse)
        else:
            i, i_sim = self.adapt_items(items[rows, cols])
            packed = self.combine(u[rows][None], u_sim[rows][None], i[None], i_sim[None], None)[0]
        out = packed.new_zeros(*items.shape, self.d)
        return out.index_put((rows, cols), packed)

    def fused(self, device: torch.device) -> bool:
        """Whether the op and the MLP's first layer run as :func:`grasp.ops.holistic_attention_projected`:
        with sigmoid gates, when that op has a kernel (not only its reference) for ``device`` and the chosen
        backend; otherwise the unfused op runs (on its own kernel where it has one)."""
        return self.attention and self.activation == "sigmoid" and has_kernel(self.backend, device.type)

    def _fused(self, u: Tensor, u_sim: Tensor, i: Tensor, i_sim: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """The enhancement ``[N, d]`` of the pairs ``(u[rows[n]], i[cols[n]])`` of adapted users and items (a
        dropped branch is a zero block of the first layer's weight)."""
        first, rest = self.mlp[0], self.mlp[1:]
        # Under autocast the op casts the adapters' outputs and the layer's parameters to the autocast dtype,
        # as nn.Linear would.
        weight, bias = first.weight, first.bias
        if self.keep is not None:
            weight = weight.new_zeros(weight.shape[0], 4 * self.d).index_copy(1, self.keep, weight)
        hidden = holistic_attention_projected(
            u, u_sim, i, i_sim, weight, bias, user_index=rows, item_index=cols, backend=self.backend
        )
        return rest(hidden)

    def score_all(self, users: Tensor, state: Tensor) -> Tensor:
        """``<state[b], enhancer(user_b, c)>`` for items c = 1..num_items: ``[B, num_items]``.

        Items go in chunks of ``chunk`` so that a chunk's ``[B, chunk, 4d]`` (unfused) or ``[B, chunk, d]``
        (fused) block stays bounded.
        """
        batch = len(users)
        u, u_sim = self.adapt_users(users)
        i_all, i_sim_all = self.adapt_items(torch.arange(1, self.num_items + 1, device=users.device))
        row_lse = None
        if self.attention and self.activation == "softmax":
            row_lse = self._gate_logits(u @ i_all.T, u_sim @ i_sim_all.T).logsumexp(1)
        fused = self.fused(users.device)
        chunk = max(1, _CHUNK_ELEMENTS // (batch * (1 if fused else 4) * self.d))
        scores = []
        for lo in range(0, self.num_items, chunk):
            i, i_sim = i_all[lo : lo + chunk], i_sim_all[lo : lo + chunk]
            if fused:
                rows = torch.arange(batch, device=users.device).repeat_interleave(len(i))
                cols = torch.arange(len(i), device=users.device).repeat(batch)
                rep = self._fused(u, u_sim, i, i_sim, rows, cols).view(batch, len(i), self.d)
            else:
                i, i_sim = (t[None].expand(batch, -1, -1) for t in (i, i_sim))
                rep = self.combine(u, u_sim, i, i_sim, None, row_lse)
            scores.append(torch.bmm(rep, state.unsqueeze(-1)).squeeze(-1))
        return torch.cat(scores, 1)


class GraspEncoder(IdEncoder):
    """GRASP item representation ``id_embedding(item) + GraspEnhancer(user, item)`` (user-conditioned)."""

    user_conditioned = True

    def __init__(self, num_items: int, d: int, enhancer: GraspEnhancer, *, init: Tensor | None = None) -> None:
        super().__init__(num_items, d, init=init)
        self.enhancer = enhancer
        self.pointwise = not (enhancer.attention and enhancer.activation == "softmax")

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """``[B] x [B, L] -> [B, L, d]``."""
        return self.embedding(items) + self.enhancer(users, items)

    def score_all(self, users: Tensor, state: Tensor) -> Tensor:
        """Every item's score with its user-conditioned representation, ``[B, num_items + 1]``."""
        scores = super().score_all(users, state)
        scores[:, 1:] += self.enhancer.score_all(users, state)
        return scores


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
