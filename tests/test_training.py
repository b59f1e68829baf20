"""Tests of grasp.training: config and flags, training batches, the training loop, checkpoints, resume, DDP."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import TinyRecommender, make_dataset, tiny_factory
from safetensors.torch import load_file

from grasp.training import TrainConfig, add_train_arguments, evaluate_run, train
from grasp.training.batches import InteractionSet, TrainBatches
from grasp.training.checkpoint import (
    CheckpointError,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
)
from grasp.training.metrics import GROUPS

WORKER = Path(__file__).with_name("_ddp_worker.py")


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _config(**kw) -> TrainConfig:
    base = dict(model="id", d=8, max_len=6, epochs=3, batch_size=16, patience=5, eval_negatives=20, device="cpu",
                dropout=0.2)  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "train_seconds"}


def _epochs_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "epochs.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------ config


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return parser.parse_args(argv)


def test_flags_defaults_match_config_and_round_trip():
    assert TrainConfig.from_args(_parse([])) == TrainConfig()
    args = _parse("--backbone gru4rec --model grasp --hae-branches self global --activation softmax --no-attention "
                  "--eval-negatives all --epochs 7 --lr 0.01 --seed 3 --device cpu "
                  "--adapter-init pca".split())  # fmt: skip
    config = TrainConfig.from_args(args)
    assert config.hae_branches == ("self", "global") and config.attention is False and config.adapter_init == "pca"
    assert config.eval_negatives == "all" and config.epochs == 7 and config.backbone == "gru4rec"
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    partial = {k: v for k, v in config.to_dict().items() if k != "id_init"}
    with pytest.raises(ValueError, match="training config keys missing: id_init"):
        TrainConfig.from_dict(partial)
    # a config written before --adapter-init existed describes the default
    older = {k: v for k, v in TrainConfig(model="grasp").to_dict().items() if k != "adapter_init"}
    assert TrainConfig.from_dict(older) == TrainConfig(model="grasp", adapter_init="random")


def test_config_holds_every_model_option():
    import inspect

    from grasp.models import build_model

    data_arguments = {"num_users", "num_items", "tables"}
    assert set(TrainConfig().model_options()) == set(inspect.signature(build_model).parameters) - data_arguments


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ("--model id --hae-branches self", "--hae-branches only apply to --model grasp"),
        ("--model llminit --activation softmax", "--activation only apply"),
        ("--model id --no-attention", "--no-attention only apply"),
        ("--model grasp --llmesr-alpha 0.5", "--llmesr-alpha only applies to --model llmesr"),
        ("--device cpu --amp", "--amp autocasts on CUDA only"),
        ("--batch-size 0", "--batch-size must be >= 1"),
        ("--dropout 1.0", "--dropout must be in"),
        ("--hidden-size 10 --num-heads 3", r"--hidden-size \(10\) must be divisible by --num-heads \(3\)"),
        ("--backbone sasrec --bert-negatives full", "--bert-negatives only apply to --backbone bert4rec"),
        ("--backbone gru4rec --mask-prob 0.5", "--mask-prob only apply to --backbone bert4rec"),
        ("--backbone bert4rec --mask-prob 0", "--mask-prob must be in"),
    ],
)
def test_incompatible_flags_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_args(_parse(argv.split()))


def test_bert4rec_flags_reach_the_model_and_config_json(tmp_path):
    from grasp.training import build_recommender

    assert TrainConfig().bert_negatives == "auto" and TrainConfig().mask_prob == 0.2
    config = TrainConfig.from_args(_parse("--model id --backbone bert4rec --bert-negatives 7 --mask-prob 0.4".split()))
    assert config.bert_negatives == 7 and config.mask_prob == 0.4
    assert TrainConfig.from_args(_parse("--backbone bert4rec --bert-negatives full".split())).bert_negatives == "full"
    data = make_dataset(_seed(), num_users=16, num_items=40, lengths=(5, 10))
    model = build_recommender(replace(config, d=8, max_len=4), data, None)
    assert model.bert_negatives == 7 and model.mask_prob == 0.4
    assert build_recommender(_config(backbone="bert4rec"), data, None).bert_negatives == 256  # auto, every model
    train(tmp_path, data, None, _config(backbone="bert4rec", bert_negatives="full", mask_prob=0.5, epochs=1,
                                        num_blocks=1), progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "config.json").read_text())["config"]
    assert saved["bert_negatives"] == "full" and saved["mask_prob"] == 0.5


def test_bad_eval_negatives_flag(capsys):
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            _parse(["--eval-negatives", bad])
        assert "--eval-negatives must be an integer >= 1 or 'all'" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            _parse(["--bert-negatives", bad])
        assert "--bert-negatives must be 'auto', 'full' or an integer >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown training config keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})


# ------------------------------------------------------------------------------------------ batches


def test_train_batches_shapes_negatives_and_replay():
    data = make_dataset(_seed())
    batches = TrainBatches(data, max_len=6, batch_size=10, seed=1)
    inter = InteractionSet(data.train, data.num_items)
    state = batches.state_dict()
    epoch = list(batches.epoch())
    seen = np.concatenate([u for u, _, _ in epoch])
    assert sorted(seen.tolist()) == list(range(1, data.num_users + 1)) and len(epoch) == len(batches)
    for users, seqs, negs in epoch:
        assert seqs.shape == negs.shape == (len(users), 7)
        for row, u in enumerate(users):
            tail = data.train[u][-7:]
            np.testing.assert_array_equal(seqs[row, 7 - len(tail) :], tail)
            assert (seqs[row, : 7 - len(tail)] == 0).all()
        assert ((negs == 0) == (seqs == 0)).all()
        real = seqs > 0
        assert not inter.contains(np.broadcast_to(users[:, None], negs.shape)[real], negs[real]).any()
    # the generator state replays the same epoch; the next epoch differs
    second = list(batches.epoch())
    batches.load_state_dict(state)
    again = list(batches.epoch())
    for a, b in zip(epoch, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(epoch, second, strict=True))


def test_training_negatives_exclude_training_items_only():
    """Held-out (validation / test) items may be training negatives, as in SASRec and RecBole."""
    data = make_dataset(_seed(), num_users=8, num_items=24, lengths=(10, 14))
    batches = TrainBatches(data, max_len=12, batch_size=8, seed=_seed())
    held_out = 0
    for _ in range(30):
        for users, _, negs in batches.epoch():
            for u, row in zip(users, negs, strict=True):
                drawn = set(row[row > 0].tolist())
                assert not drawn & set(data.train[u].tolist())
                held_out += len(drawn & {int(data.valid_items[u]), int(data.test_items[u])})
    assert held_out > 0


def test_train_batches_ddp_shards_union_is_global_batch():
    data = make_dataset(_seed())
    single = list(TrainBatches(data, 5, 8, seed=4).epoch())
    shards = [list(TrainBatches(data, 5, 8, seed=4).epoch(rank, 3)) for rank in range(3)]
    for i, (users, seqs, negs) in enumerate(single):
        if len(users) < 3:  # a last batch smaller than the world size is dropped under DDP
            assert all(len(s) == i for s in shards)
            continue
        parts = [s[i] for s in shards]
        assert sorted(np.concatenate([p[0] for p in parts]).tolist()) == sorted(users.tolist())
        np.testing.assert_array_equal(parts[1][2], negs[1::3])
        np.testing.assert_array_equal(parts[0][1], seqs[0::3])
    with pytest.raises(ValueError, match="rank must be in"):
        next(TrainBatches(data, 5, 8, seed=4).epoch(2, 2))


# ------------------------------------------------------------------------------------------ training


def test_train_writes_outputs(tmp_path):
    data = make_dataset(_seed())
    metrics = train(tmp_path, data, None, _config(), progress=False, model_factory=tiny_factory)
    assert set(metrics["test"]) == set(GROUPS) and set(metrics["valid"]) == set(GROUPS)
    assert set(metrics["test"]["overall"]) == {f"{m}@{k}" for m in ("NDCG", "HR") for k in (1, 3, 5, 10, 20)}
    assert 0 <= metrics["test"]["overall"]["NDCG@10"] <= metrics["test"]["overall"]["HR@10"] <= 100
    assert metrics["epochs"] == 3 and 1 <= metrics["best_epoch"] <= 3 and metrics["train_seconds"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert [r["epoch"] for r in _epochs_rows(tmp_path)] == ["1", "2", "3"]
    report = (tmp_path / "report.md").read_text()
    assert f"training history length ≥ {data.head_user_threshold}" in report and "| head items |" in report
    for name in ("last.safetensors", "last.pt", "best.safetensors"):
        assert (tmp_path / "checkpoints" / name).is_file()
    assert (tmp_path / "eval_negatives.npz").is_file()
    assert not list(tmp_path.rglob(".*tmp*"))
    # the best checkpoint re-evaluates to the same test metrics
    again = evaluate_run(tmp_path, data, None, device="cpu", model_factory=tiny_factory, print_table=False)
    assert again["test"] == metrics["test"] and again["epoch"] == metrics["best_epoch"]
    full = evaluate_run(tmp_path, data, None, device="cpu", eval_negatives="all", model_factory=tiny_factory,
                        print_table=False)  # fmt: skip
    assert full["eval_negatives"] == "all"
    assert full["test"]["overall"]["HR@10"] <= metrics["test"]["overall"]["HR@10"]  # more candidates, harder


class DegradingOracle(torch.nn.Module):
    """Scores ``w * oracle[user, item]`` where the oracle ranks each user's validation and test items first.

    The loss is ``w`` itself: Adam lowers ``w`` by ``lr`` per step, from 1 through 0 to negative values, so
    the ranking is perfect while ``w > 0`` and the worst possible once ``w < 0``.
    """

    objective = "next"

    def __init__(self, dataset) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        oracle = torch.rand(dataset.num_users + 1, dataset.num_items + 1) * 0.5
        users = torch.arange(1, dataset.num_users + 1)
        oracle[users, torch.from_numpy(dataset.valid_items[1:])] = 1.0
        oracle[users, torch.from_numpy(dataset.test_items[1:])] = 1.0
        self.register_buffer("oracle", oracle, persistent=False)

    def loss(self, users, seqs, negatives):
        return self.w

    def score(self, users, seqs, candidates):
        return self.w * self.oracle[users[:, None], candidates]

    def score_all(self, users, seqs):
        scores = self.w * self.oracle[users]
        scores[:, 0] = float("-inf")
        return scores


def test_early_stopping_keeps_best(tmp_path):
    data = make_dataset(_seed())  # 48 users, batch 16: 3 steps of -0.2 per epoch, w = 0.4, -0.2, -0.8
    models = []

    def factory(config, dataset, tables):
        models.append(DegradingOracle(dataset))
        models[-1].oracle = models[0].oracle  # evaluate_run's fresh model sees the same oracle
        return models[-1]

    metrics = train(tmp_path, data, None, _config(lr=0.2, epochs=50, patience=2, dropout=0.0), progress=False,
                    model_factory=factory)  # fmt: skip
    assert metrics["best_epoch"] == 1 and metrics["epochs"] == 3 and metrics["stopped_early"]
    valid = [float(r["valid_NDCG@10"]) for r in _epochs_rows(tmp_path)]
    assert valid[0] == 100.0 and max(valid[1:]) < valid[0]
    assert metrics["test"]["overall"]["NDCG@10"] == 100.0  # the test metrics come from best.safetensors
    best = evaluate_run(tmp_path, data, None, device="cpu", model_factory=factory, print_table=False)
    last = evaluate_run(tmp_path, data, None, checkpoint="last", device="cpu", model_factory=factory,
                        print_table=False)  # fmt: skip
    assert best["test"] == metrics["test"] and best["epoch"] == 1 and last["epoch"] == 3
    assert last["test"]["overall"]["NDCG@10"] < metrics["test"]["overall"]["NDCG@10"]


def test_training_state_loads_without_unpickling_objects(tmp_path):
    train(tmp_path, make_dataset(_seed()), None, _config(epochs=1), progress=False, model_factory=tiny_factory)
    state = load_training_state(tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "last.safetensors")
    assert {"optimizer", "scaler", "batches", "rng", "trainer"} <= set(state)
    assert isinstance(state["rng"][0]["python"], tuple) and torch.is_tensor(state["rng"][0]["torch"])
    save_training_state(tmp_path / "evil.pt", {"epoch": 1, "payload": argparse.Namespace(x=1)})
    with pytest.raises(CheckpointError, match="unreadable training state"):
        load_training_state(tmp_path / "evil.pt", tmp_path / "checkpoints" / "last.safetensors")


def test_full_ranking_run(tmp_path):
    data = make_dataset(_seed())
    metrics = train(tmp_path, data, None, _config(eval_negatives="all", epochs=1), progress=False,
                    model_factory=tiny_factory)  # fmt: skip
    assert not (tmp_path / "eval_negatives.npz").exists()
    assert metrics["config"]["eval_negatives"] == "all"
    assert "full ranking" in (tmp_path / "report.md").read_text()


def test_resume_equals_uninterrupted_run(tmp_path):
    data = make_dataset(_seed())
    straight = train(tmp_path / "a", data, None, _config(epochs=4), progress=False, model_factory=tiny_factory)
    train(tmp_path / "b", data, None, _config(epochs=2), progress=False, model_factory=tiny_factory)
    resumed = train(tmp_path / "b", data, None, _config(epochs=4), resume=True, progress=False,
                    model_factory=tiny_factory)  # fmt: skip
    assert _without_timing(resumed) == _without_timing(straight)
    assert _epochs_rows(tmp_path / "a") == _epochs_rows(tmp_path / "b")
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(tmp_path / "a" / "checkpoints" / name), load_file(tmp_path / "b" / "checkpoints" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_dir_config_mismatch(tmp_path):
    data = make_dataset(_seed())
    train(tmp_path, data, None, _config(epochs=1), progress=False, model_factory=tiny_factory)
    with pytest.raises(ValueError, match=r"different setup \(lr: 0.001 -> 0.01\)"):
        train(tmp_path, data, None, _config(epochs=1, lr=0.01), progress=False, model_factory=tiny_factory)
    with pytest.raises(ValueError, match="different data"):
        train(tmp_path, make_dataset(_seed()), None, _config(epochs=1), progress=False, model_factory=tiny_factory)
    metrics = train(tmp_path, data, None, _config(epochs=1, lr=0.01), progress=False, force=True,
                    model_factory=tiny_factory)  # fmt: skip
    assert metrics["config"]["lr"] == 0.01


def test_checkpoint_mismatch_names_keys(tmp_path):
    model = TinyRecommender(20, d=8)
    save_weights(tmp_path / "w.safetensors", model, {"epoch": 1})
    mismatch = r"w\.safetensors: .*size mismatch for emb\.weight: .*\[21, 8\].*\[21, 4\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load_weights(tmp_path / "w.safetensors", TinyRecommender(20, d=4))
    bigger = TinyRecommender(20, d=8)
    bigger.extra = torch.nn.Linear(2, 2)
    missing = r'w\.safetensors: .*Missing key\(s\) in state_dict: "extra\.weight", "extra\.bias"'
    with pytest.raises(CheckpointError, match=missing):
        load_weights(tmp_path / "w.safetensors", bigger)
    save_weights(tmp_path / "big.safetensors", bigger)
    unexpected = r'big\.safetensors: .*Unexpected key\(s\) in state_dict: "extra\.bias", "extra\.weight"'
    with pytest.raises(CheckpointError, match=unexpected):
        load_weights(tmp_path / "big.safetensors", model)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(tmp_path / "none.safetensors", model)
    fresh = TinyRecommender(20, d=8)
    assert load_weights(tmp_path / "w.safetensors", fresh) == {"epoch": "1"}
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboard")
    train(tmp_path, make_dataset(_seed()), None, _config(epochs=1, tensorboard=True), progress=False,
          model_factory=tiny_factory)  # fmt: skip
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_output(tmp_path, capsys):
    train(tmp_path, make_dataset(_seed()), None, _config(epochs=1), progress=True, model_factory=tiny_factory)
    assert "epoch 1: loss" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_training_step(tmp_path):
    data = make_dataset(_seed())
    metrics = train(tmp_path, data, None, _config(epochs=1, compile=True), progress=False, model_factory=tiny_factory)
    assert metrics["epochs"] == 1 and 0 <= metrics["test"]["overall"]["NDCG@10"] <= 100


# ------------------------------------------------------------------------------------------ DDP


def test_ddp_two_processes_match_one(tmp_path):
    """Two gloo ranks with half the batch each vs one process: the same updates up to float rounding.

    Every user has a full-length sequence and there is no dropout, so each rank's mean loss averages as
    many positions as the other's and the averaged gradients equal the single-process gradient; the
    tolerance covers reduction-order rounding (weights within 1e-4, metrics within 1 point).
    """
    seed = _seed()
    spec = dict(model="id", d=8, max_len=6, epochs=2, batch_size=16, eval_negatives=20, device="cpu", dropout=0.0)
    data_kw = dict(num_users=64, num_items=60, lengths=(9, 9))
    single = train(tmp_path / "one", make_dataset(seed, **data_kw), None, TrainConfig(**spec), progress=False,
                   model_factory=tiny_factory)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp_path / "two"), str(seed), json.dumps({**spec, "data": data_kw})]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert double["world_size"] == 2 and single["world_size"] == 1
    for group in GROUPS:
        if single["test"][group] is None:
            assert double["test"][group] is None
            continue
        for k, v in single["test"][group].items():
            assert abs(double["test"][group][k] - v) <= 1.0, (group, k)
    a = load_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ real models


def _random_tables(data, dim: int = 12, k: int = 3):
    from grasp.pipeline.tables import Tables

    def table(n):
        t = torch.randn(n + 1, dim).numpy()
        t[0] = 0
        return t

    def neighbors(n):
        ids = torch.randint(1, n + 1, (n + 1, k)).numpy().astype(np.int64)
        ids[0] = 0
        return ids

    return Tables(user=table(data.num_users), user_sim=table(data.num_users), item=table(data.num_items),
                  item_sim=table(data.num_items), user_neighbors=neighbors(data.num_users),
                  item_neighbors=neighbors(data.num_items))  # fmt: skip


@pytest.mark.parametrize(
    ("backbone", "model"),
    [("sasrec", "id"), ("sasrec", "grasp"), ("bert4rec", "id"), ("sasrec", "llmesr"), ("gru4rec", "llminit")],
)
def test_real_models_train_and_resume_exactly(tmp_path, backbone, model):
    pytest.importorskip("grasp.models")
    data = make_dataset(_seed(), num_users=32, num_items=40, lengths=(5, 15))  # >= 20 eval negatives per user
    tables = _random_tables(data) if model != "id" else None
    config = _config(backbone=backbone, model=model, epochs=2, num_blocks=1, batch_size=8)
    straight = train(tmp_path / "a", data, tables, config, progress=False)
    assert straight["test"]["overall"]["HR@20"] > 0
    config.epochs = 1
    train(tmp_path / "b", data, tables, config, progress=False)
    config.epochs = 2
    resumed = train(tmp_path / "b", data, tables, config, resume=True, progress=False)
    assert _without_timing(resumed) == _without_timing(straight)
    a = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if model == "llmesr":  # the distillation teacher bank is saved, so resuming continues with it
        assert a["distillation.filled"][1:].all()
