"""Tests of grasp.training.metrics and grasp.training.evaluate: metrics from ranks, negatives, ranking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _ddp_worker import make_dataset
from _support import random_llm_tables

from grasp.training.batches import InteractionSet, history_matrix
from grasp.training.evaluate import (
    compute_ranks,
    dataset_fingerprint,
    evaluate_split,
    load_or_create_eval_negatives,
    sample_eval_negatives,
)
from grasp.training.metrics import KS, group_metrics, ranking_metrics


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


# ------------------------------------------------------------------------------------------ metrics


def test_ranking_metrics_hand_computed():
    m = ranking_metrics(np.array([0, 2, 9, 50]))
    assert m["HR@1"] == pytest.approx(25.0)
    assert m["HR@3"] == pytest.approx(50.0)
    assert m["HR@10"] == pytest.approx(75.0)
    assert m["HR@20"] == pytest.approx(75.0)
    assert m["NDCG@1"] == pytest.approx(25.0)
    assert m["NDCG@3"] == pytest.approx(100 * (1 + 1 / math.log2(4)) / 4)
    assert m["NDCG@10"] == pytest.approx(100 * (1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4)
    assert set(m) == {f"{name}@{k}" for k in KS for name in ("NDCG", "HR")}


def test_ranking_metrics_random_against_loop():
    ranks = torch.randint(0, 30, (200,)).numpy()
    m = ranking_metrics(ranks)
    for k in KS:
        assert m[f"HR@{k}"] == pytest.approx(100 * sum(r < k for r in ranks) / len(ranks))
        assert m[f"NDCG@{k}"] == pytest.approx(100 * sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks))


def test_ranking_metrics_edge_cases():
    assert ranking_metrics(np.zeros(0, dtype=np.int64)) is None
    with pytest.raises(ValueError, match="ranks must be >= 0"):
        ranking_metrics(np.array([0, -1]))
    with pytest.raises(ValueError, match="1-D"):
        ranking_metrics(np.zeros((2, 2)))


def test_group_metrics_splits_by_user_and_target_item():
    user_is_head = np.array([False, True, False, True])
    item_is_head = np.array([False, False, True, True, False])
    users = np.array([1, 2, 3, 2])
    targets = np.array([2, 3, 4, 1])
    ranks = np.array([0, 5, 30, 1])
    groups, sizes = group_metrics(ranks, users, targets, user_is_head, item_is_head)
    assert sizes == {"overall": 4, "tail_user": 2, "head_user": 2, "tail_item": 2, "head_item": 2}
    assert groups["head_user"]["HR@1"] == 50.0  # users 1 and 3: ranks 0 and 30
    assert groups["tail_user"]["HR@10"] == 100.0  # user 2 twice: ranks 5 and 1
    assert groups["head_item"]["HR@1"] == 50.0  # targets 2 and 3: ranks 0 and 5
    assert groups["head_item"]["HR@10"] == 100.0
    assert groups["tail_item"]["HR@3"] == 50.0  # targets 4 and 1: ranks 30 and 1


def test_group_metrics_empty_group_is_none():
    groups, sizes = group_metrics(np.array([0]), np.array([1]), np.array([1]), np.array([False, True]),
                                  np.array([False, True]))  # fmt: skip
    assert groups["tail_user"] is None and sizes["tail_user"] == 0
    assert groups["head_user"]["HR@1"] == 100.0


# ------------------------------------------------------------------------------------------ negatives


def test_eval_negatives_are_distinct_unseen_and_deterministic():
    data = make_dataset(_seed())
    inter = InteractionSet(data.sequences, data.num_items)
    neg = sample_eval_negatives(data, 20, seed=5)
    assert neg.shape == (data.num_users + 1, 20) and (neg[0] == 0).all()
    for u in range(1, data.num_users + 1):
        assert len(set(neg[u].tolist())) == 20
        assert not set(neg[u].tolist()) & set(data.sequences[u].tolist())
    assert not inter.contains(np.arange(1, data.num_users + 1)[:, None], neg[1:]).any()
    assert neg[1:].min() >= 1 and neg.max() <= data.num_items
    np.testing.assert_array_equal(neg, sample_eval_negatives(data, 20, seed=5))
    assert not np.array_equal(neg, sample_eval_negatives(data, 20, seed=6))


def test_eval_negatives_exact_path_for_crowded_users():
    # Users who saw most items go through the exact per-user pool; still distinct and unseen.
    data = make_dataset(_seed(), num_users=10, num_items=30, lengths=(20, 24))
    neg = sample_eval_negatives(data, 6, seed=1)
    for u in range(1, data.num_users + 1):
        assert len(set(neg[u].tolist())) == 6 and not set(neg[u].tolist()) & set(data.sequences[u].tolist())
    with pytest.raises(ValueError, match="fewer than --eval-negatives 20"):
        sample_eval_negatives(data, 20, seed=1)


def test_eval_negatives_file_reused_and_checked(tmp_path):
    data = make_dataset(_seed())
    path = tmp_path / "eval_negatives.npz"
    first = load_or_create_eval_negatives(path, data, 10, 3)
    assert path.is_file()
    np.testing.assert_array_equal(load_or_create_eval_negatives(path, data, 10, 3), first)
    with pytest.raises(ValueError, match="not 12"):
        load_or_create_eval_negatives(path, data, 12, 3)
    with pytest.raises(ValueError, match="seed 3, not 4"):
        load_or_create_eval_negatives(path, data, 10, 4)
    other = make_dataset(_seed() + 1)
    assert dataset_fingerprint(other) != dataset_fingerprint(data)
    with pytest.raises(ValueError, match="dataset differs"):
        load_or_create_eval_negatives(path, other, 10, 3)


# ------------------------------------------------------------------------------------------ ranking


class FixedScores(torch.nn.Module):
    """Scores each item by a fixed per-item value (ignores users and history)."""

    objective = "next"

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.values = values

    def score(self, users, seqs, candidates):
        return self.values[candidates]

    def score_all(self, users, seqs):
        out = self.values.expand(len(users), -1).clone()
        out[:, 0] = float("-inf")
        return out


def test_sampled_ranks_count_ties_against_target():
    data = make_dataset(_seed())
    values = torch.randint(0, 4, (data.num_items + 1,)).float()  # many ties
    neg = sample_eval_negatives(data, 15, seed=0)
    users, targets, ranks = compute_ranks(FixedScores(values), data, "test", max_len=5, negatives=neg, batch_size=7)
    v = values.numpy()
    expected = [(v[neg[u]] >= v[t]).sum() for u, t in zip(users, targets, strict=True)]
    np.testing.assert_array_equal(ranks, expected)
    np.testing.assert_array_equal(targets, data.test_items[1:])


@pytest.mark.parametrize("split", ["valid", "test"])
def test_full_ranking_excludes_history_keeps_target(split):
    data = make_dataset(_seed())
    values = torch.randn(data.num_items + 1)
    values[data.valid_items[1]] = 100.0  # user 1's validation item scores highest
    users, targets, ranks = compute_ranks(FixedScores(values), data, split, max_len=5, batch_size=9)
    v = values.numpy()
    for u, t, r in zip(users, targets, ranks, strict=True):
        hist = set(data.train[u].tolist()) | ({int(data.valid_items[u])} if split == "test" else set())
        cands = [i for i in range(1, data.num_items + 1) if i not in hist or i == t]
        assert r == sum(v[i] >= v[t] for i in cands) - 1
    if split == "valid":  # user 1's target scores highest of all
        assert ranks[0] == 0


def test_nan_scores_raise():
    data = make_dataset(_seed())
    values = torch.zeros(data.num_items + 1)
    values[data.test_items[3]] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN scores for user"):
        compute_ranks(FixedScores(values), data, "test", max_len=5, batch_size=4)


def test_evaluate_split_perfect_model():
    data = make_dataset(_seed())
    neg = sample_eval_negatives(data, 10, seed=0)

    class Oracle(FixedScores):
        def score(self, users, seqs, candidates):
            return (candidates == torch.from_numpy(data.valid_items)[users][:, None]).float()

    groups, sizes = evaluate_split(Oracle(torch.zeros(1)), data, "valid", max_len=5, negatives=neg, batch_size=16)
    assert groups["overall"]["NDCG@1"] == 100.0 and groups["overall"]["HR@20"] == 100.0
    assert sizes["overall"] == data.num_users
    assert sizes["head_user"] + sizes["tail_user"] == data.num_users


def test_history_matrix_left_pads_last_items():
    data = make_dataset(_seed())
    hist = history_matrix(data, "test", 6)
    for u in range(1, data.num_users + 1):
        full = np.append(data.train[u], data.valid_items[u])[-6:]
        np.testing.assert_array_equal(hist[u, 6 - len(full) :], full)
        assert (hist[u, : 6 - len(full)] == 0).all()
    with pytest.raises(ValueError, match="split must be 'valid' or 'test'"):
        history_matrix(data, "train", 3)


class LinearScorer(torch.nn.Module):
    """Scores through a linear layer (which autocast would run in bfloat16); records the score dtypes."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, num_items + 1)
        self.dtypes = []

    def score_all(self, users, seqs):
        x = torch.randn(len(users), 4, generator=torch.Generator().manual_seed(0)) + users[:, None].float()
        scores = self.proj(x)
        self.dtypes.append(scores.dtype)
        return scores

    def score(self, users, seqs, candidates):
        return self.score_all(users, seqs).gather(1, candidates)


@pytest.mark.parametrize("full", [False, True])
def test_evaluation_scores_in_float32_even_inside_autocast(full):
    data = make_dataset(_seed(), num_users=12, num_items=40, lengths=(5, 10))
    negatives = None if full else sample_eval_negatives(data, 10, seed=1)
    model = LinearScorer(data.num_items)
    expected = compute_ranks(model, data, "test", max_len=4, negatives=negatives)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a caller training under --amp
        ranks = compute_ranks(model, data, "test", max_len=4, negatives=negatives)
    assert set(model.dtypes) == {torch.float32}
    np.testing.assert_array_equal(ranks[2], expected[2])


class AllItemsOnly(torch.nn.Module):
    """A Recommender seen through score_all alone: the all-items ranking of the same model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def score_all(self, users, seqs):
        return self.model.score_all(users, seqs)


@pytest.mark.parametrize(("backbone", "model"), [("sasrec", "grasp"), ("bert4rec", "id"), ("gru4rec", "llmesr")])
def test_full_ranking_through_the_fused_top_k_equals_all_items_below_the_cutoff(backbone, model):
    """Full ranking of a Recommender runs encoder.topk (no [B, num_items] scores): ranks below max(KS) equal
    those of score_all, the others are max(KS)."""
    from grasp.models import build_model

    data = make_dataset(_seed(), num_users=30, num_items=120, lengths=(5, 30))
    tables = random_llm_tables(data.num_users, data.num_items)
    net = build_model(backbone, model, num_users=data.num_users, num_items=data.num_items, d=8, max_len=6,
                      tables=tables).eval()  # fmt: skip
    _, _, fused = compute_ranks(net, data, "test", max_len=6, batch_size=7)
    _, _, every = compute_ranks(AllItemsOnly(net), data, "test", max_len=6, batch_size=7)
    np.testing.assert_array_equal(fused, np.minimum(every, max(KS)))
    assert (every < max(KS)).any() and (every >= max(KS)).any()
