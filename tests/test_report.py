"""Tests of grasp.training.report: per-run report, seed aggregation, run comparison, ``grasp report`` flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import make_dataset, tiny_factory

from grasp.training import TrainConfig, train
from grasp.training.metrics import GROUPS, KS
from grasp.training.report import (
    add_report_arguments,
    aggregate,
    compare_runs,
    load_run,
    metrics_tables,
    report_main,
    write_report,
    write_summary,
)


def _fake_metrics(seed: int, model: str = "grasp", fingerprint: str = "abc", empty: str | None = None) -> dict:
    """A metrics.json-shaped dict with random numbers."""
    values = torch.rand(len(GROUPS), 2 * len(KS)).mul(100).tolist()

    def groups(offset: float) -> dict:
        return {g: None if g == empty else {f"{m}@{k}": values[i][j * len(KS) + n] + offset
                                            for j, m in enumerate(("NDCG", "HR")) for n, k in enumerate(KS)}
                for i, g in enumerate(GROUPS)}  # fmt: skip

    config = TrainConfig(model=model, seed=seed).to_dict()
    return {
        "config": config,
        "dataset": {"name": "toy", "fingerprint": fingerprint},
        "test": groups(0.0),
        "valid": groups(1.0),
        "group_sizes": {"test": {g: 5 for g in GROUPS}},
        "thresholds": {"head_user": 7, "head_item": 3},
        "best_epoch": seed % 5 + 1,
        "epochs": 10,
        "train_seconds": float(seed),
    }


def _write_run(directory: Path, metrics: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


def test_aggregate_mean_and_sample_std():
    runs = [_fake_metrics(s) for s in (42, 43, 44)]
    summary = aggregate(runs)
    assert summary["seeds"] == [42, 43, 44] and summary["runs"] == 3 and "seed" not in summary["config"]
    for g in GROUPS:
        for key in runs[0]["test"][g]:
            vals = [r["test"][g][key] for r in runs]
            assert summary["test"][g][key]["mean"] == pytest.approx(np.mean(vals))
            assert summary["test"][g][key]["std"] == pytest.approx(np.std(vals, ddof=1))
    assert summary["train_seconds"] == {"mean": 43.0, "std": pytest.approx(1.0)}
    assert summary["thresholds"] == {"head_user": 7, "head_item": 3}
    single = aggregate(runs[:1])
    assert single["test"]["overall"]["NDCG@10"]["std"] == 0.0


def test_aggregate_rejects_mixed_runs_and_handles_empty_groups():
    with pytest.raises(ValueError, match="differ in more than the seed: (id_init, )?model"):
        aggregate([_fake_metrics(1), _fake_metrics(2, model="id")])
    with pytest.raises(ValueError, match="different datasets"):
        aggregate([_fake_metrics(1), _fake_metrics(2, fingerprint="zzz")])
    with pytest.raises(ValueError, match="at least one"):
        aggregate([])
    summary = aggregate([_fake_metrics(1, empty="tail_item"), _fake_metrics(2)])
    assert summary["test"]["tail_item"] is None and summary["test"]["head_item"] is not None


def test_report_tables_format(tmp_path):
    metrics = _fake_metrics(42, empty="head_user")
    path = write_report(tmp_path, metrics)
    text = path.read_text()
    assert "| group | users | NDCG@1 |" in text and f"{metrics['test']['overall']['NDCG@10']:.2f}" in text
    assert "training history length ≥ 7" in text and "popularity ≥ 3" in text
    assert "| head users | 5 | – |" in text
    assert "target + 100 sampled negatives" in text and "| backbone | `sasrec` |" in text
    summary = write_summary(tmp_path / "multi", [_fake_metrics(s) for s in (42, 43)])
    multi = (tmp_path / "multi" / "report.md").read_text()
    assert "Mean ± std over 2 seeds (42, 43)" in multi
    assert (
        f"{summary['test']['overall']['HR@5']['mean']:.2f} ± {summary['test']['overall']['HR@5']['std']:.2f}" in multi
    )
    assert json.loads((tmp_path / "multi" / "metrics.json").read_text()) == summary
    assert metrics_tables(summary) == multi


def test_compare_runs_single_seeds_and_plot(tmp_path):
    single = _write_run(tmp_path / "sasrec-id", _fake_metrics(42, model="id"))
    for s in (42, 43, 44):
        _write_run(tmp_path / "sasrec-grasp" / f"seed{s}", _fake_metrics(s))
    seeds = aggregate([json.loads((tmp_path / "sasrec-grasp" / f"seed{s}" / "metrics.json").read_text())
                       for s in (42, 43, 44)])  # fmt: skip
    assert load_run(tmp_path / "sasrec-grasp") == seeds
    table = compare_runs([single, tmp_path / "sasrec-grasp"], out=tmp_path / "cmp.md", plot=tmp_path / "cmp.png")
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | model | backbone | dataset | seeds | NDCG@10 |")
    id_ndcg = json.loads((single / "metrics.json").read_text())["test"]["overall"]["NDCG@10"]
    assert lines[2].startswith(f"| sasrec-id | id | sasrec | toy | 1 | {id_ndcg:.2f} |")
    tail = seeds["test"]["tail_user"]["NDCG@10"]
    assert lines[3].startswith("| sasrec-grasp | grasp |") and f"{tail['mean']:.2f} ± {tail['std']:.2f}" in lines[3]
    assert (tmp_path / "cmp.md").read_text() == table
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grasp_id_init_is_named_when_not_the_default(tmp_path):
    random_init = _fake_metrics(42)
    random_init["config"]["id_init"] = "random"
    default = _fake_metrics(42)
    runs = [_write_run(tmp_path / name, m) for name, m in (("random", random_init), ("pca", default))]
    lines = compare_runs(runs).strip().splitlines()
    assert lines[2].startswith("| random | grasp (id-init random) | sasrec |")
    assert lines[3].startswith("| pca | grasp | sasrec |")
    assert metrics_tables(random_init).startswith("# sasrec / grasp (id-init random) on toy")
    assert TrainConfig.from_dict(default["config"]).id_init == "pca" == TrainConfig(model="grasp").id_init
    assert TrainConfig(model="id").id_init is None


def test_compare_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json and no seed"):
        compare_runs([tmp_path])
    (tmp_path / "metrics.json").write_text("{\n  oops")
    with pytest.raises(ValueError, match="metrics.json:2: invalid JSON"):
        compare_runs([tmp_path])
    with pytest.raises(ValueError, match="at least one run directory"):
        compare_runs([])


def test_report_command_on_real_runs(tmp_path, capsys):
    data = make_dataset(int(torch.randint(0, 2**31 - 1, ()).item()))
    for seed in (42, 43):
        config = TrainConfig(d=8, max_len=5, epochs=1, batch_size=16, eval_negatives=10, device="cpu", seed=seed)
        train(tmp_path / "run" / f"seed{seed}", data, None, config, progress=False, model_factory=tiny_factory)
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "run"), str(tmp_path / "run" / "seed42"), "--plot", str(tmp_path / "p.png")]
    )
    assert report_main(args) == 0
    out = capsys.readouterr().out
    assert "| run | id | sasrec | tiny | 2 |" in out and "| run/seed42 | id |" in out
    assert (tmp_path / "p.png").is_file()
