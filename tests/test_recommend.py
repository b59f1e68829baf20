"""grasp.TrainedRecommender and `grasp recommend` end to end on a small trained run."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import grasp
from grasp.cli import main
from grasp.training.batches import pad_left

DATA = ["--dataset", "synthetic", "--synthetic-users", "60", "--synthetic-items", "80"]
FAST = ["--epochs", "1", "--hidden-size", "16", "--max-len", "12", "--eval-negatives", "20", "--no-progress",
        "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A GRASP run of two seeds (hash-encoder LLM tables: fast and deterministic)."""
    from _support import HashEncoder

    import grasp.embedding

    path = tmp_path_factory.mktemp("recommend") / "grasp"
    patch = pytest.MonkeyPatch()
    patch.setattr(grasp.embedding, "make_encoder", lambda name, **options: HashEncoder(**options))
    try:
        assert main(["train", "--out", str(path), *DATA, *FAST, "--model", "grasp", "--seeds", "1", "2"]) == 0
    finally:
        patch.undo()
    return path


def brute_force(rec, users, k, exclude_seen=True):
    """Top-k original item ids and scores by the model's own score_all, ties to the smaller id."""
    ds, model = rec.dataset, rec.model
    ids = [ds.user_ids[u] for u in users]
    seqs = [ds.sequences[i] for i in ids]
    window = torch.from_numpy(pad_left(seqs, rec.config.max_len))
    with torch.no_grad():
        scores = model.score_all(torch.tensor(ids), window).double()
    if exclude_seen:
        for row, seq in enumerate(seqs):
            scores[row, torch.from_numpy(seq)] = float("-inf")
    order = torch.sort(scores, dim=1, descending=True, stable=True)
    return order, scores


def assert_is_top_k(got_items, got_scores, scores_row, k, tokens, tol=1e-4):
    """The returned items are k distinct items whose scores are the k best up to ``tol`` (near ties may order
    differently between the fused and the unfused arithmetic), best first."""
    assert len(got_items) == k and len(set(got_items)) == k
    index = [tokens.index(i) for i in got_items]
    truth = scores_row[index]
    torch.testing.assert_close(torch.tensor(got_scores, dtype=torch.float64), truth, atol=tol, rtol=1e-5)
    kth_best = scores_row.sort(descending=True).values[k - 1]
    assert (truth >= kth_best - tol).all()
    assert all(a >= b - tol for a, b in zip(got_scores, got_scores[1:], strict=False))


def test_recommend_is_the_models_own_top_k_in_original_ids(run):
    rec = grasp.TrainedRecommender.load(run, seed=1, device="cpu")
    users = rec.dataset.user_tokens[1:8]
    out = rec.recommend(users, k=6)
    _, scores = brute_force(rec, users, 6)
    assert out.users == users and out.titles is not None and len(out.titles[0]) == 6
    for n, user in enumerate(users):
        assert_is_top_k(out.items[n], out.scores[n], scores[n], 6, rec.dataset.item_tokens)
        seen = {rec.dataset.item_tokens[i] for i in rec.dataset.sequences[rec.dataset.user_ids[user]]}
        assert not seen & set(out.items[n])
        titles = [rec.dataset.item_attributes[rec.dataset.item_ids[i]]["title"] for i in out.items[n]]
        assert out.titles[n] == titles


def test_include_seen_and_candidates(run):
    rec = grasp.TrainedRecommender.load(run / "seed2", device="cpu")
    user = rec.dataset.user_tokens[3]
    _, scores = brute_force(rec, [user], 5, exclude_seen=False)
    everything = rec.recommend([user], k=5, exclude_seen=False)
    assert_is_top_k(everything.items[0], everything.scores[0], scores[0], 5, rec.dataset.item_tokens)
    candidates = rec.dataset.item_tokens[1:11]
    within = rec.recommend([user], k=10, exclude_seen=False, candidates=candidates)
    assert sorted(within.items[0]) == sorted(candidates)
    seen = {rec.dataset.item_tokens[i] for i in rec.dataset.sequences[rec.dataset.user_ids[user]]}
    excluded = rec.recommend([user], k=10, candidates=candidates)
    assert set(excluded.items[0]) == set(candidates) - seen  # fewer rows than k: what remains


def test_histories_and_new_users(run):
    rec = grasp.TrainedRecommender.load(run, seed=1, device="cpu")
    tokens = rec.dataset.item_tokens
    history = [tokens[5], tokens[9], tokens[2]]
    out = rec.recommend(["someone-new", rec.dataset.user_tokens[1]], k=4, histories=[history, None])
    assert len(out.items[0]) == 4 and not set(history) & set(out.items[0])
    # a new user is the padding user (row 0): the same as scoring user id 0 with that history
    window = torch.from_numpy(pad_left([np.array([5, 9, 2])], rec.config.max_len))
    with torch.no_grad():
        scores = rec.model.score_all(torch.tensor([0]), window)[0].double()
    scores[[5, 9, 2]] = float("-inf")
    assert_is_top_k(out.items[0], out.scores[0], scores, 4, tokens)
    with pytest.raises(ValueError, match=r"histories\[0\]: unknown item id 'no-such-item'"):
        rec.recommend(["x"], histories=[["no-such-item"]])
    with pytest.raises(ValueError, match="unknown user id 'nobody'"):
        rec.recommend(["nobody"])
    with pytest.raises(ValueError, match="k must be an int in 1..80"):
        rec.recommend([rec.dataset.user_tokens[1]], k=0)


def test_load_refuses_what_does_not_match(run, tmp_path):
    with pytest.raises(ValueError, match="seeds 1, 2; choose one"):
        grasp.TrainedRecommender.load(run)
    with pytest.raises(ValueError, match="no seed 7"):
        grasp.TrainedRecommender.load(run, seed=7)
    with pytest.raises(FileNotFoundError, match="train.json: missing"):
        grasp.TrainedRecommender.load(tmp_path)
    with pytest.raises(ValueError, match="checkpoint must be 'best' or 'last'"):
        grasp.TrainedRecommender.load(run, "middle", seed=1)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_cli_writes_every_users_rows(run, tmp_path, capsys, suffix):
    out = tmp_path / f"recs{suffix}"
    argv = ["recommend", str(run), "--users", "all", "--k", "3", "--out", str(out), "--seed", "1",
            "--batch-size", "16", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "rows for 60 users" in capsys.readouterr().out
    if suffix == ".csv":
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        rows = pq.read_table(out).to_pylist()
    assert len(rows) == 60 * 3 and set(rows[0]) == {"user_id", "rank", "item_id", "score", "title"}
    rec = grasp.TrainedRecommender.load(run, seed=1, device="cpu")
    first = rec.recommend([rows[0]["user_id"]], k=3)
    assert [r["item_id"] for r in rows[:3]] == first.items[0]
    assert [int(r["rank"]) for r in rows[:3]] == [1, 2, 3]
    assert main(argv) == 2  # an existing output needs --force
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0


def test_cli_user_file_errors_name_the_line(run, tmp_path, capsys):
    users = tmp_path / "users.txt"
    users.write_text("U01\n\nnot-a-user\n", encoding="utf-8")
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(run / "seed1"), "--users", str(users), "--out", str(out)]) == 2
    assert "users.txt:3: unknown user id 'not-a-user'" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "recs.csv.partial").exists()
    assert main(["recommend", str(run / "seed1"), "--users", "all", "--out", str(tmp_path / "r.txt")]) == 2
    assert "unknown format '.txt'" in capsys.readouterr().err
