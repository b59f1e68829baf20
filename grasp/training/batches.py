"""Training batches: one left-padded sequence per user per epoch, with sampled negatives (SASRec style).

Each epoch :class:`TrainBatches` shuffles the users, and for every position of every user's sequence draws
one negative item that is not among the user's *training* items by vectorised rejection sampling (as
pmixer's SASRec and RecBole do: the held-out validation and test items may be drawn as negatives, since
training must not know them). All
randomness comes from one seeded :class:`numpy.random.Generator` whose state is checkpointed
(:meth:`TrainBatches.state_dict`), so a resumed run draws exactly what an uninterrupted one would.
Under DDP every rank draws the same permutation and negatives and takes its own share of each batch, so
the union of the ranks' batches is the single-process batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from grasp.data import Dataset

__all__ = ["TrainBatches", "InteractionSet", "pad_left", "history_matrix"]


def pad_left(sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
    """``int64 [len(sequences), length]``: the last ``length`` items of each sequence, left-padded with 0."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:] if length else seq[:0]
        if len(tail):
            out[row, length - len(tail) :] = tail
    return out


def history_matrix(dataset: Dataset, split: str, length: int) -> np.ndarray:
    """``int64 [num_users + 1, length]``: the history before ``split``'s target, left-padded (row 0 zeros).

    ``"valid"`` gives the training items (what predicts the validation item), ``"test"`` the training
    items plus the validation item.
    """
    if split == "valid":
        return pad_left(dataset.train, length)
    if split == "test":
        seqs = [dataset.train[0]] + [
            np.append(dataset.train[u], dataset.valid_items[u]) for u in range(1, dataset.num_users + 1)
        ]
        return pad_left(seqs, length)
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


class InteractionSet:
    """Which (user, item) pairs occur in per-user item sequences, for vectorised lookups.

    Args:
        sequences: item ids per user id (index 0 = padding user), e.g. ``dataset.sequences`` (every split:
            evaluation negatives) or ``dataset.train`` (training items only: training negatives).
        num_items: items are ``1..num_items``.
    """

    def __init__(self, sequences: Sequence[np.ndarray], num_items: int) -> None:
        self.num_items = num_items
        users = np.concatenate(
            [np.full(len(s), u, dtype=np.int64) for u, s in enumerate(sequences) if len(s)]
            or [np.zeros(0, dtype=np.int64)]
        )
        items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences if len(s)] or [users[:0]])
        self._keys = np.unique(users * (self.num_items + 1) + items)
        self.counts = np.bincount(self._keys // (self.num_items + 1), minlength=len(sequences))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean array (broadcast shape of ``users`` and ``items``): did the user interact with the item?"""
        keys = np.asarray(users, dtype=np.int64) * (self.num_items + 1) + np.asarray(items, dtype=np.int64)
        pos = np.searchsorted(self._keys, keys)
        pos = np.minimum(pos, max(len(self._keys) - 1, 0))
        return self._keys[pos] == keys if len(self._keys) else np.zeros(keys.shape, dtype=bool)

    def sample_negatives(self, rng: np.random.Generator, users: np.ndarray, shape_per_user: int) -> np.ndarray:
        """``int64 [len(users), shape_per_user]`` items not in each user's set (repeats allowed)."""
        users = np.asarray(users, dtype=np.int64)
        full = users[self.counts[users] >= self.num_items]
        if len(full):
            raise ValueError(f"user {int(full[0])} has every item in its set: no negative item to sample")
        out = rng.integers(1, self.num_items + 1, size=(len(users), shape_per_user), dtype=np.int64)
        row_users = np.broadcast_to(users[:, None], out.shape)
        bad = np.flatnonzero(self.contains(row_users, out))
        while len(bad):
            flat = out.reshape(-1)
            flat[bad] = rng.integers(1, self.num_items + 1, size=len(bad), dtype=np.int64)
            still = self.contains(row_users.reshape(-1)[bad], flat[bad])
            bad = bad[still]
        return out


class TrainBatches:
    """Per-epoch training batches of ``(users, seqs, negatives)``.

    ``seqs`` holds each user's last ``max_len + 1`` training items, left-padded with 0; ``negatives`` one
    item per position that is not among the user's training items (0 where ``seqs`` is 0). Users with no
    training item are skipped.

    Args:
        dataset: the preprocessed dataset.
        max_len: the model's history length (sequences are ``max_len + 1`` long).
        batch_size: users per global batch.
        seed: seeds the generator of permutations and negatives.
    """

    def __init__(self, dataset: Dataset, max_len: int, batch_size: int, seed: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seqs = pad_left(dataset.train, max_len + 1)
        self.users = np.flatnonzero(self.seqs[:, -1] > 0).astype(np.int64)
        if len(self.users) == 0:
            raise ValueError(f"dataset {dataset.name!r} has no user with a training item")
        self.interactions = InteractionSet(dataset.train, dataset.num_items)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.users) // self.batch_size)

    @property
    def num_users(self) -> int:
        """Training users per epoch."""
        return len(self.users)

    def epoch(self, rank: int = 0, world_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """One epoch of batches for ``rank`` of ``world_size`` (draws everything for the epoch up front).

        Every rank draws the same permutation and negatives; rank ``r`` gets rows ``r::world_size`` of each
        global batch. Under DDP a last global batch with fewer users than ranks is dropped, so every rank
        gets a non-empty share of every batch and the ranks step together.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        order = self.users[self.rng.permutation(len(self.users))]
        seqs = self.seqs[order]
        negatives = self.interactions.sample_negatives(self.rng, order, seqs.shape[1])
        negatives[seqs == 0] = 0
        for start in range(0, len(order), self.batch_size):
            if len(order) - start < world_size:
                break
            part = slice(start + rank, start + self.batch_size, world_size)
            yield order[part], seqs[part], negatives[part]

    def state_dict(self) -> dict[str, Any]:
        """The generator state (JSON- and pickle-friendly)."""
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.rng.bit_generator.state = state["bit_generator"]
