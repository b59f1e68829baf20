"""``Recommender``: an item encoder + a backbone, with the training loss and the scoring functions."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from grasp.models.item_encoders import IdEncoder

__all__ = ["Recommender", "NeighborDistillation"]


class NeighborDistillation(nn.Module):
    """LLM-ESR's retrieval-augmented self-distillation, with a memory-bank teacher.

    LLM-ESR pulls a user's sequence representation (the backbone output at the last position) towards the
    mean of the sequence representations of the user's most similar users (retrieved with the LLM user
    embeddings), detached, with an MSE loss weighted by ``alpha``. Encoding the neighbours' sequences would
    need every user's history inside the model and k extra forward passes per batch. Here the teacher is the
    mean of the neighbours' representations as last computed during training: every :meth:`forward` stores
    the batch users' detached representations in a ``[num_users + 1, width]`` bank. Neighbours not seen yet
    are left out of the mean; users with none seen contribute nothing. So the teacher is the same quantity
    as LLM-ESR's, at most one epoch stale.

    ``bank`` and ``filled`` are persistent buffers: they are saved with the weights, so a resumed run
    continues with the same teacher (exact resume). The neighbour table is frozen input, rebuilt from the
    tables and not saved. Under ``torch.distributed`` (training only) every rank all-gathers the batch users
    and representations of all ranks (shards may differ in size by a few users) before writing the bank,
    so every rank's bank equals the single-process bank.

    Args:
        neighbors: int ``[num_users + 1, k]`` neighbour ids (``Tables.user_neighbors``).
        width: width of the representations.
        alpha: weight of the term in the loss.
    """

    def __init__(self, neighbors: np.ndarray, width: int, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.register_buffer("neighbors", torch.as_tensor(np.asarray(neighbors, dtype=np.int64)), persistent=False)
        self.register_buffer("bank", torch.zeros(len(neighbors), width))
        self.register_buffer("filled", torch.zeros(len(neighbors), dtype=torch.bool))

    def forward(self, users: Tensor, rep: Tensor) -> Tensor:
        """Unweighted MSE between ``rep [B, width]`` and the teachers; then store ``rep`` in the bank."""
        neighbors = self.neighbors[users]
        seen = self.filled[neighbors].unsqueeze(-1)
        count = seen.sum(1)
        teacher = (self.bank[neighbors] * seen).sum(1) / count.clamp(min=1)
        per_user = (rep - teacher).pow(2).mean(-1)
        has_teacher = count.squeeze(-1) > 0
        loss = (per_user * has_teacher).sum() / has_teacher.sum().clamp(min=1)
        with torch.no_grad():
            users, rep = _gather_from_ranks(users, rep.detach().to(self.bank.dtype))
            self.bank[users] = rep
            self.filled[users] = True
        return loss


def _gather_from_ranks(users: Tensor, rep: Tensor) -> tuple[Tensor, Tensor]:
    """``(users, rep)`` concatenated over the ranks of the default process group (unchanged without one).

    Shards may differ in length: each rank pads its rows to the longest shard, all ranks all-gather, and
    the padding rows are dropped.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return users, rep
    world = dist.get_world_size()
    size = torch.tensor([len(users)], device=users.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded_users = users.new_zeros(longest)
    padded_users[: len(users)] = users
    padded_rep = rep.new_zeros(longest, rep.shape[1])
    padded_rep[: len(rep)] = rep
    all_users = [torch.zeros_like(padded_users) for _ in range(world)]
    all_rep = [torch.zeros_like(padded_rep) for _ in range(world)]
    dist.all_gather(all_users, padded_users)
    dist.all_gather(all_rep, padded_rep)
    counts = [int(s.item()) for s in sizes]
    users = torch.cat([u[:n] for u, n in zip(all_users, counts, strict=True)])
    return users, torch.cat([r[:n] for r, n in zip(all_rep, counts, strict=True)])


class Recommender(nn.Module):
    """A sequential recommender: item encoder -> backbone -> dot-product scores.

    Attributes:
        objective: ``"next"`` (SASRec, GRU4Rec: BCE with one sampled negative per position, paper eq. 6) or
            ``"masked"`` (BERT4Rec: cloze objective).
        encoder: the item encoder (:mod:`grasp.models.item_encoders`); a multi-view encoder's views are
            encoded by the same backbone (stacked along the batch) and concatenated.
        backbone: ``backbone(x [B, L, d], mask [B, L]) -> [B, L, d]`` (:mod:`grasp.models.backbones`).
        mask_prob: BERT4Rec's masking probability of each real item.
        bert_negatives: ``None``: BERT4Rec's cross-entropy over the full catalogue (a user-conditioned
            encoder, GRASP's, encodes every item for every user of the batch: costly); ``K``: a sampled
            softmax over the target and K items drawn uniformly (shared by the batch, accidental hits
            removed).
        distillation: LLM-ESR's :class:`NeighborDistillation`, or None.

    All sequences are left-padded with 0; items are 1..num_items; randomness uses the torch global RNG.
    """

    def __init__(
        self,
        encoder: IdEncoder,
        backbone: nn.Module,
        *,
        objective: str,
        num_items: int,
        max_len: int,
        mask_prob: float = 0.2,
        bert_negatives: int | None = None,
        distillation: NeighborDistillation | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.backbone = backbone
        self.objective = objective
        self.num_items = num_items
        self.max_len = max_len
        self.mask_prob = mask_prob
        self.bert_negatives = bert_negatives
        self.distillation = distillation

    @property
    def mask_token(self) -> int:
        """BERT4Rec's mask item id, ``num_items + 1``."""
        return self.num_items + 1

    def hidden(self, users: Tensor, seqs: Tensor) -> Tensor:
        """Backbone states ``[B, L, width]`` of the left-padded item windows ``seqs [B, L]``."""
        return self._encode(self.encoder(users, seqs), seqs > 0)

    def _encode(self, x: Tensor, mask: Tensor) -> Tensor:
        """The backbone over item vectors ``x [B, L, width]``, one view at a time (views share the backbone)."""
        views = self.encoder.views
        if views > 1:
            x, mask = torch.cat(x.chunk(views, -1)), mask.repeat(views, 1)
        h = self.backbone(x, mask)
        return torch.cat(h.chunk(views), -1) if views > 1 else h

    def loss(self, users: Tensor, seqs: Tensor, negatives: Tensor) -> Tensor:
        """Training loss of a batch (see the spec in the module docs of :mod:`grasp.models`).

        Args:
            users: ``[B]`` user ids.
            seqs: ``[B, max_len + 1]`` the last training items, left-padded with 0.
            negatives: ``[B, max_len + 1]`` one sampled negative per position (0 where ``seqs`` is 0);
                used by the ``"next"`` objective.
        """
        _check(users, seqs, "seqs", self.max_len + 1, min_length=2)
        if negatives.shape != seqs.shape:
            raise ValueError(f"negatives must have seqs' shape {tuple(seqs.shape)}, got {tuple(negatives.shape)}")
        if self.objective == "next":
            h, loss = self._next_item_loss(users, seqs, negatives[:, 1:])
        else:
            targets = seqs[:, 1:]
            # Only sequences with two or more items are masked: a lone item would be predicted from nothing.
            real = targets > 0
            chosen = (torch.rand(targets.shape, device=targets.device) < self.mask_prob) & real
            chosen &= real.sum(1, keepdim=True) >= 2
            h = self.hidden(users, targets.masked_fill(chosen, self.mask_token))
            loss = self._cloze_loss(users, h, targets, chosen)
        if self.distillation is not None:
            loss = loss + self.distillation.alpha * self.distillation(users, h[:, -1])
        return loss

    def _next_item_loss(self, users: Tensor, seqs: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor]:
        """States of ``seqs[:, :-1]`` and the BCE loss of predicting ``seqs[:, 1:]`` against ``negatives``."""
        length = seqs.shape[1] - 1
        if self.encoder.pointwise:
            # One encoder pass over inputs, targets (the inputs shifted by one) and negatives.
            reps = self.encoder(users, torch.cat([seqs, negatives], 1))
            x, pos_rep, neg_rep = reps[:, :length], reps[:, 1 : length + 1], reps[:, length + 1 :]
        else:
            x, pos_rep, neg_rep = (self.encoder(users, t) for t in (seqs[:, :-1], seqs[:, 1:], negatives))
        h = self._encode(x, seqs[:, :-1] > 0)
        # A target needs a real item before it: the first item (all-padding context) is never a target, so a
        # user with one item contributes nothing.
        valid = (seqs[:, 1:] > 0) & (seqs[:, :-1] > 0)
        pos, neg = (h * pos_rep).sum(-1), (h * neg_rep).sum(-1)
        per_position = F.softplus(-pos) + F.softplus(neg)  # BCE(pos, 1) + BCE(neg, 0)
        return h, (per_position * valid).sum() / valid.sum().clamp(min=1)

    def _cloze_loss(self, users: Tensor, h: Tensor, targets: Tensor, chosen: Tensor) -> Tensor:
        count = chosen.sum().clamp(min=1)
        if self.bert_negatives is None:
            if self.encoder.user_conditioned:  # every item's vector for every user: B x num_items encodings
                items = torch.arange(1, self.num_items + 1, device=targets.device).expand(len(users), -1)
                logits = torch.bmm(h, self.encoder(users, items).transpose(1, 2))[chosen]
            else:
                logits = h[chosen] @ self.encoder.item_table()[1:].T
            return F.cross_entropy(logits, targets[chosen] - 1, reduction="sum") / count
        sampled = torch.randint(1, self.num_items + 1, (self.bert_negatives,), device=targets.device)
        sampled_rep = self.encoder(users, sampled.expand(len(users), -1))
        pos = (h * self.encoder(users, targets)).sum(-1, keepdim=True)
        neg = torch.bmm(h, sampled_rep.transpose(1, 2)).masked_fill(sampled == targets.unsqueeze(-1), float("-inf"))
        logits = torch.cat([pos, neg], -1)[chosen]
        return F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long), reduction="sum") / count

    def user_state(self, users: Tensor, seqs: Tensor) -> Tensor:
        """The user state ``[B, width]`` that scores the next item after ``seqs [B, L]``.

        ``"next"``: the backbone output at the last position. ``"masked"``: the mask token is appended (the
        oldest item dropped when the window is full) and its output is the state.
        """
        _check(users, seqs, "seqs", self.max_len)
        if self.objective == "masked":
            keep = seqs[:, 1:] if seqs.shape[1] == self.max_len else seqs
            seqs = torch.cat([keep, keep.new_full((len(keep), 1), self.mask_token)], 1)
        return self.hidden(users, seqs)[:, -1]

    def score(self, users: Tensor, seqs: Tensor, candidates: Tensor) -> Tensor:
        """Scores ``[B, C]`` of ``candidates [B, C]`` as the next item after ``seqs [B, max_len]``; higher = better."""
        if candidates.dim() != 2 or len(candidates) != len(users):
            raise ValueError(f"candidates must be [B, C] with B = {len(users)}, got {tuple(candidates.shape)}")
        state = self.user_state(users, seqs)
        return torch.bmm(self.encoder(users, candidates), state.unsqueeze(-1)).squeeze(-1)

    def score_all(self, users: Tensor, seqs: Tensor) -> Tensor:
        """Scores ``[B, num_items + 1]`` of every item (column 0, padding, is ``-inf``)."""
        scores = self.encoder.score_all(users, self.user_state(users, seqs))
        scores[:, 0] = float("-inf")
        return scores


def _check(users: Tensor, seqs: Tensor, name: str, max_length: int, min_length: int = 1) -> None:
    if users.dim() != 1:
        raise ValueError(f"users must be a 1-d [B] tensor, got shape {tuple(users.shape)}")
    if seqs.dim() != 2 or len(seqs) != len(users):
        raise ValueError(f"{name} must be [B, L] with B = {len(users)} (the users), got {tuple(seqs.shape)}")
    if not min_length <= seqs.shape[1] <= max_length:
        raise ValueError(f"{name} has length {seqs.shape[1]}; expected {min_length}..{max_length}")
