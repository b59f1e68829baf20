"""Helpers of the training tests: a tiny Recommender, a random dataset, and a torchrun entry point.

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/_ddp_worker.py RUN_DIR SEED ...``
trains the tiny model on the dataset of ``SEED`` with the config given as JSON (see ``main``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grasp.data import RawDataset, preprocess


class TinyRecommender(nn.Module):
    """ID embeddings, causal mean pooling and dropout; the Recommender interface of the spec ("next" objective)."""

    objective = "next"

    def __init__(self, num_items: int, d: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_items = num_items
        self.emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def _states(self, seqs: torch.Tensor) -> torch.Tensor:
        """[B, L, d]: the mean of the non-padded embeddings up to each position, projected."""
        e = self.dropout(self.emb(seqs))
        count = (seqs > 0).float().cumsum(1).clamp_min(1.0)
        return self.proj(e.cumsum(1) / count[..., None])

    def loss(self, users: torch.Tensor, seqs: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        states = self._states(seqs[:, :-1])
        pos, neg = seqs[:, 1:], negatives[:, 1:]
        pos_logit = (states * self.emb(pos)).sum(-1)
        neg_logit = (states * self.emb(neg)).sum(-1)
        mask = (pos > 0).float()
        bce = F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit), reduction="none")
        bce = bce + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit), reduction="none")
        return (bce * mask).sum() / mask.sum().clamp_min(1.0)

    def score(self, users: torch.Tensor, seqs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        state = self._states(seqs)[:, -1]
        return (self.emb(candidates) * state[:, None]).sum(-1)

    def score_all(self, users: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        scores = self._states(seqs)[:, -1] @ self.emb.weight.T
        scores[:, 0] = float("-inf")
        return scores


def tiny_factory(config, dataset, tables) -> TinyRecommender:
    """A ``model_factory`` for :func:`grasp.training.train`."""
    return TinyRecommender(dataset.num_items, d=config.d, dropout=config.dropout)


def make_dataset(seed: int, num_users: int = 48, num_items: int = 60, lengths: tuple[int, int] = (5, 20)):
    """A random preprocessed dataset: each user has ``lengths`` items drawn with a popularity skew."""
    rng = np.random.default_rng(seed)
    users, items, times = [], [], []
    popularity = 1.0 / np.arange(1, num_items + 1) ** 0.8
    popularity /= popularity.sum()
    for u in range(num_users):
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        seq = rng.choice(num_items, size=n, replace=False, p=popularity)
        users += [f"u{u}"] * n
        items += [f"i{i}" for i in seq]
        times += list(np.sort(rng.uniform(0, 1e6, size=n)))
    raw = RawDataset("tiny", np.array(users, dtype=object), np.array(items, dtype=object), np.array(times))
    return preprocess(raw)


def gather_bank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` target: each rank writes a different number of users into an llmesr
    distillation bank; every rank saves its bank to ``out_dir/bank{rank}.pt``."""
    from grasp.models.recommender import NeighborDistillation

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        neighbors = np.ones((11, 2), dtype=np.int64)
        module = NeighborDistillation(neighbors, width=3, alpha=0.1)
        users = torch.arange(1, 11)[rank::world_size][: 5 - 2 * rank]  # rank 0: 5 users, rank 1: 3 users
        module(users, users[:, None].float() * torch.tensor([1.0, 10.0, 100.0]))
        torch.save({"bank": module.bank, "filled": module.filled}, Path(out_dir) / f"bank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def main(argv: list[str]) -> None:
    """torchrun entry: ``RUN_DIR DATA_SEED CONFIG_JSON`` (dataset kwargs under the ``"data"`` key)."""
    from grasp.training import TrainConfig, train

    run_dir, data_seed, spec = Path(argv[0]), int(argv[1]), json.loads(argv[2])
    dataset = make_dataset(data_seed, **spec.pop("data", {}))
    train(run_dir, dataset, None, TrainConfig(**spec), progress=False, model_factory=tiny_factory)


if __name__ == "__main__":
    main(sys.argv[1:])
