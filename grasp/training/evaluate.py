"""Leave-one-out evaluation (docs/design.md section 7).

Validation ranks ``valid_items[u]`` given the user's training history; test ranks ``test_items[u]`` given
training history plus the validation item. Two candidate sets:

* sampled (default): the target plus ``n`` negatives per user, drawn once with a fixed seed from the
  items the user never interacted with in any split (distinct items), the same set for validation and
  test, for every epoch and every model. :func:`load_or_create_eval_negatives` stores them in
  ``run_dir/eval_negatives.npz`` together with the dataset fingerprint, and checks both on reuse.
* full ranking (``"all"``): every item, scored with ``model.score_all`` one user batch at a time. Items in
  the user's history (training items; for test also the validation item) are excluded from the ranking,
  the target always stays in, padding id 0 is never a candidate.

Ties count against the target: its 0-based rank is the number of other candidates scoring at least as
high. A NaN score is an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from grasp._io import atomic_write
from grasp.data import Dataset
from grasp.training.batches import InteractionSet, history_matrix
from grasp.training.metrics import KS, group_metrics

__all__ = [
    "dataset_fingerprint",
    "sample_eval_negatives",
    "load_or_create_eval_negatives",
    "compute_ranks",
    "evaluate_split",
]

_CHUNK_USERS = 8192


def dataset_fingerprint(dataset: Dataset) -> str:
    """A SHA-256 hex digest of the dataset's sizes and every user's item sequence (identifies a split)."""
    h = hashlib.sha256()
    h.update(np.array([dataset.num_users, dataset.num_items], dtype=np.int64).tobytes())
    h.update(np.array([len(s) for s in dataset.sequences], dtype=np.int64).tobytes())
    for s in dataset.sequences:
        h.update(np.ascontiguousarray(s, dtype=np.int64).tobytes())
    return h.hexdigest()


def sample_eval_negatives(dataset: Dataset, count: int, seed: int) -> np.ndarray:
    """``int64 [num_users + 1, count]``: per user ``count`` distinct items it never interacted with (row 0 zeros).

    Deterministic in ``(dataset, count, seed)``. Users with plenty of candidate items are sampled by
    vectorised rejection in chunks; the rest (and any chunk row that fell short) exactly from their pool.

    Raises:
        ValueError: a user has fewer than ``count`` never-interacted items (names the user).
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    inter = InteractionSet(dataset.sequences, dataset.num_items)
    n_items = dataset.num_items
    available = n_items - inter.counts
    short = np.flatnonzero(available[1:] < count) + 1
    if len(short):
        u = int(short[0])
        raise ValueError(
            f"user {u} ({dataset.user_tokens[u]!r}) has only {int(available[u])} items it never interacted with, "
            f"fewer than --eval-negatives {count}: use fewer negatives or --eval-negatives all"
        )
    rng = np.random.Generator(np.random.PCG64(seed))
    out = np.zeros((dataset.num_users + 1, count), dtype=np.int64)
    draws = 4 * count + 16
    exact: list[int] = []
    users_all = np.arange(1, dataset.num_users + 1, dtype=np.int64)
    for start in range(0, len(users_all), _CHUNK_USERS):
        users = users_all[start : start + _CHUNK_USERS]
        easy = available[users] >= np.maximum(2 * count, n_items // 2)
        exact.extend(users[~easy].tolist())
        users = users[easy]
        if not len(users):
            continue
        cand = rng.integers(1, n_items + 1, size=(len(users), draws), dtype=np.int64)
        ok = ~inter.contains(users[:, None], cand)
        first = np.zeros(cand.size, dtype=bool)
        keys = np.repeat(np.arange(len(users), dtype=np.int64), draws) * (n_items + 1) + cand.reshape(-1)
        first[np.unique(keys, return_index=True)[1]] = True
        ok &= first.reshape(cand.shape)
        done = ok.sum(axis=1) >= count
        order = np.argsort(~ok, axis=1, kind="stable")[:, :count]
        out[users[done]] = np.take_along_axis(cand, order, axis=1)[done]
        exact.extend(users[~done].tolist())
    for u in sorted(exact):
        pool = np.setdiff1d(np.arange(1, n_items + 1, dtype=np.int64), dataset.sequences[u])
        out[u] = rng.choice(pool, size=count, replace=False)
    return out


def load_or_create_eval_negatives(path: Path, dataset: Dataset, count: int, seed: int) -> np.ndarray:
    """The evaluation negatives stored at ``path`` (an ``.npz``), sampling and saving them first if absent.

    Raises:
        ValueError: the file exists but was made for another dataset, count or seed (names the file and
            the difference); delete it to sample again.
    """
    path = Path(path)
    fingerprint = dataset_fingerprint(dataset)
    if path.exists():
        with np.load(path) as f:
            saved = {k: f[k] for k in ("negatives", "fingerprint", "count", "seed")} if "negatives" in f else None
        if saved is None:
            raise ValueError(f"{path}: not an evaluation negatives file (no 'negatives' array); delete it")
        problems = []
        if str(saved["fingerprint"]) != fingerprint:
            problems.append("the dataset differs (fingerprint mismatch)")
        if int(saved["count"]) != count:
            problems.append(f"it holds {int(saved['count'])} negatives per user, not {count}")
        if int(saved["seed"]) != seed:
            problems.append(f"it was sampled with seed {int(saved['seed'])}, not {seed}")
        if problems:
            raise ValueError(f"{path}: {'; '.join(problems)}; delete the file to sample new negatives")
        return saved["negatives"].astype(np.int64)
    negatives = sample_eval_negatives(dataset, count, seed)
    arrays = {"negatives": negatives, "fingerprint": np.array(fingerprint), "count": np.array(count),
              "seed": np.array(seed)}  # fmt: skip
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return negatives


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _check_finite(scores: torch.Tensor, users: torch.Tensor) -> None:
    nan = torch.isnan(scores).any(dim=1)
    if nan.any():
        raise FloatingPointError(f"the model produced NaN scores for user {int(users[nan][0])} during evaluation")


@torch.no_grad()
def compute_ranks(
    model: torch.nn.Module,
    dataset: Dataset,
    split: str,
    *,
    max_len: int,
    negatives: np.ndarray | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank every user's ``split`` target (``"valid"`` or ``"test"``).

    Scores are computed in float32 with autocast disabled, even when called inside an autocast region
    (training under ``--amp``): half-precision scores create ties, which count against the target.

    Args:
        model: a :class:`~grasp.models.Recommender` (put in eval mode here).
        negatives: ``[num_users + 1, n]`` sampled negatives, or ``None`` for full ranking.

    Returns:
        ``(users, targets, ranks)``: int64 arrays over users ``1..num_users``, ranks 0-based.
    """
    if split not in ("valid", "test"):
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
    device = torch.device(device)
    model.eval()
    seqs_all = history_matrix(dataset, split, max_len)
    targets_all = dataset.valid_items if split == "valid" else dataset.test_items
    users_all = np.arange(1, dataset.num_users + 1, dtype=np.int64)
    ranks = np.empty(len(users_all), dtype=np.int64)
    for part in _batches(len(users_all), batch_size):
        users_np = users_all[part]
        users = torch.from_numpy(users_np).to(device)
        seqs = torch.from_numpy(seqs_all[users_np]).to(device)
        targets = torch.from_numpy(targets_all[users_np]).to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            if negatives is None and hasattr(model, "encoder"):
                hist = _histories(dataset, split, users_np)
                ranks[part] = _full_ranks_top(model, users, seqs, targets, hist, device).cpu().numpy()
                continue
            if negatives is not None:
                cands = torch.cat([targets[:, None], torch.from_numpy(negatives[users_np]).to(device)], dim=1)
                scores = model.score(users, seqs, cands).float()
            else:
                scores = model.score_all(users, seqs).float()
        _check_finite(scores, users)
        if negatives is not None:
            rank = (scores[:, 1:] >= scores[:, :1]).sum(dim=1)
        else:
            rows = torch.arange(len(users_np), device=device)
            target_score = scores[rows, targets]
            excluded = torch.zeros_like(scores, dtype=torch.bool)
            excluded[:, 0] = True
            hist = _histories(dataset, split, users_np)
            hist_rows = np.repeat(np.arange(len(users_np)), [len(h) for h in hist])
            hist_cols = np.concatenate(hist) if hist else np.zeros(0, dtype=np.int64)
            excluded[torch.from_numpy(hist_rows).to(device), torch.from_numpy(hist_cols).to(device)] = True
            excluded[rows, targets] = False
            rank = ((scores >= target_score[:, None]) & ~excluded).sum(dim=1) - 1
        ranks[part] = rank.cpu().numpy()
    return users_all, targets_all[users_all], ranks


def _histories(dataset: Dataset, split: str, users: np.ndarray) -> list[np.ndarray]:
    """Each user's items before ``split``'s target (excluded from full ranking, unless they are the target)."""
    if split == "valid":
        return [dataset.train[u] for u in users]
    return [np.append(dataset.train[u], dataset.valid_items[u]) for u in users]


def _full_ranks_top(
    model: torch.nn.Module,
    users: torch.Tensor,
    seqs: torch.Tensor,
    targets: torch.Tensor,
    hist: list[np.ndarray],
    device: torch.device,
) -> torch.Tensor:
    """Full-ranking ranks of a :class:`~grasp.models.Recommender` from its fused top-k scoring (history left out,
    the target kept), exact below ``max(KS)`` and ``max(KS)`` otherwise.

    With the ``max(KS) + 1`` best items: if fewer than ``max(KS)`` of them (the target aside) score at least the
    target's score, one of them scores below it, and so does every item outside the list: the count is the
    rank. Otherwise the rank is at least ``max(KS)``. Only ranks below ``max(KS)`` count in the metrics, so they
    equal those of scoring every item, without a ``[B, num_items]`` score matrix. The target's own score comes
    from the model's candidate scoring; a target tied with an item to the last bits may rank one place apart
    from the all-items computation.
    """
    depth = min(max(KS) + 1, model.encoder.num_items)
    state = model.user_state(users, seqs)
    target_score = torch.bmm(model.encoder(users, targets[:, None]), state.unsqueeze(-1)).squeeze(-1).float()
    _check_finite(target_score, users)
    width = max(1, max(len(h) for h in hist))
    exclude = torch.zeros(len(hist), width, dtype=torch.int64)
    for row, items in enumerate(hist):
        exclude[row, : len(items)] = torch.from_numpy(items)
    exclude = exclude.to(device)
    exclude = torch.where(exclude == targets[:, None], 0, exclude)  # the target stays a candidate
    scores, items = model.encoder.topk(users, state, depth, exclude)
    _check_finite(scores, users)
    above = (scores >= target_score) & (items != targets[:, None]) & (items > 0)
    return above.sum(dim=1).clamp(max=max(KS))


def evaluate_split(
    model: torch.nn.Module,
    dataset: Dataset,
    split: str,
    **kwargs,
) -> tuple[dict[str, dict[str, float] | None], dict[str, int]]:
    """:func:`compute_ranks` then :func:`~grasp.training.metrics.group_metrics`: metrics per group and sizes."""
    users, targets, ranks = compute_ranks(model, dataset, split, **kwargs)
    return group_metrics(ranks, users, targets, dataset.user_is_head, dataset.item_is_head)
