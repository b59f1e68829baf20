"""Tests of grasp.training.report: per-run report, seed aggregation, run comparison (grouping, labels, chart)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import make_dataset, tiny_factory
from matplotlib.container import BarContainer

from grasp.cli import main
from grasp.training import TrainConfig, train
from grasp.training.metrics import GROUPS, KS
from grasp.training.report import (
    add_report_arguments,
    aggregate,
    compare_runs,
    comparison_figure,
    group_runs,
    load_run,
    metrics_tables,
    report_main,
    run_labels,
    shared_settings,
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
    with pytest.raises(ValueError, match="differ in more than the seed: (adapter_init, )?(id_init, )?model"):
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
    text = compare_runs([single, tmp_path / "sasrec-grasp"], out=tmp_path / "cmp.md", plot=tmp_path / "cmp.png")
    lines = text.strip().splitlines()
    assert lines[0] == "## toy: target + 100 sampled negatives, eval seed 2025"  # one group: no note
    assert lines[2] == "Head users: training history length ≥ 7; head items: training popularity ≥ 3."
    assert len(lines) == 8 and lines[4].startswith("| run | model | seeds | NDCG@10 | HR@10 | tail user NDCG@10 |")
    id_ndcg = json.loads((single / "metrics.json").read_text())["test"]["overall"]["NDCG@10"]
    assert lines[6].startswith(f"| sasrec-id | SASRec | 1 | {id_ndcg:.2f} |")
    tail = seeds["test"]["tail_user"]["NDCG@10"]
    assert (
        lines[7].startswith("| sasrec-grasp | SASRec + GRASP | 3 |")
        and f"{tail['mean']:.2f} ± {tail['std']:.2f}" in lines[7]
    )
    assert (tmp_path / "cmp.md").read_text() == text
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grasp_id_init_is_named_when_not_the_default(tmp_path):
    random_init = _fake_metrics(42)
    random_init["config"]["id_init"] = "random"
    default = _fake_metrics(42)
    runs = [_write_run(tmp_path / name, m) for name, m in (("random", random_init), ("pca", default))]
    lines = compare_runs(runs).strip().splitlines()
    assert lines[6].startswith("| random | SASRec + GRASP (id-init random) | 1 |")
    assert lines[7].startswith("| pca | SASRec + GRASP | 1 |")
    assert metrics_tables(random_init).startswith("# sasrec / grasp (id-init random) on toy")
    assert TrainConfig.from_dict(default["config"]).id_init == "pca" == TrainConfig(model="grasp").id_init
    assert TrainConfig(model="id").id_init is None


def test_grasp_adapter_init_is_named_when_not_the_default():
    metrics = _fake_metrics(42)
    metrics["config"]["adapter_init"] = "pca"
    assert metrics_tables(metrics).startswith("# sasrec / grasp (adapter-init pca) on toy")
    metrics["config"]["id_init"] = "random"
    assert metrics_tables(metrics).startswith("# sasrec / grasp (id-init random, adapter-init pca) on toy")
    assert TrainConfig(model="grasp").adapter_init == "random" and TrainConfig(model="id").adapter_init is None


def _config(**options) -> dict:
    """A run's config: the plain backbone unless ``options`` name a model (the defaults otherwise)."""
    return TrainConfig(**{"model": "id", **options}).to_dict()


def test_run_labels_name_backbone_model_and_changed_options():
    configs = [
        _config(model="id"),
        _config(model="grasp", activation="softmax", hae_branches=("self", "similar")),
        _config(model="grasp", hae_branches=("global", "similar", "self")),  # all branches, in another order
        _config(model="grasp", attention=False),
        _config(model="llminit"),
        _config(model="llmesr", llmesr_alpha=0.5),
        _config(backbone="bert4rec", mask_prob=0.3),
        _config(backbone="gru4rec", model="llmesr"),
    ]
    names = [f"run{i}" for i in range(len(configs))]
    assert run_labels(configs, names) == [
        "SASRec",
        "SASRec + GRASP (branches self+similar, softmax)",
        "SASRec + GRASP",
        "SASRec + GRASP (no-attention)",
        "SASRec + LLMInit",
        "SASRec + LLM-ESR (llmesr-alpha 0.5)",
        "BERT4Rec (mask-prob 0.3)",
        "GRU4Rec + LLM-ESR",
    ]
    # General settings: shared ones are stated once, not in the labels; differing ones label the runs.
    shared = [_config(model=m, max_len=50, patience=10, lr=5e-4 if m == "grasp" else 1e-3, seed=s)
              for m, s in (("id", 1), ("grasp", 2))]  # fmt: skip
    assert run_labels(shared, ["a", "b"]) == ["SASRec", "SASRec + GRASP (lr 0.0005)"]
    assert shared_settings(shared) == ["max-len 50", "patience 10"]
    assert shared_settings([_config(d=32), _config(d=16)]) == []
    # A multi-seed summary's config (no seed, epochs or device) labels the same way.
    summary = aggregate([_fake_metrics(s, model="llminit") for s in (1, 2)])
    assert run_labels([summary["config"]], ["x"]) == ["SASRec + LLMInit"]
    # Equal labels are told apart by the run's name, then by position.
    assert run_labels([_config(), _config(), _config(model="grasp")], ["id-a", "id-b", "g"]) == [
        "SASRec [id-a]", "SASRec [id-b]", "SASRec + GRASP"
    ]  # fmt: skip
    assert run_labels([_config(), _config()], ["same", "same"]) == ["SASRec [same] #1", "SASRec [same] #2"]


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _bars(ax) -> list[BarContainer]:
    return [c for c in ax.containers if isinstance(c, BarContainer)]


def test_report_groups_runs_by_dataset_and_protocol(tmp_path, capsys):
    def run(name: str, dataset: str = "toy", fingerprint: str = "abc", model: str = "id", **config) -> Path:
        metrics = _fake_metrics(42, model=model, fingerprint=fingerprint)
        metrics["dataset"]["name"] = dataset
        metrics["config"].update(config)
        return _write_run(tmp_path / name, metrics)

    runs = [
        run("toy-id"),
        run("books-id", dataset="books", fingerprint="f00d" * 16),
        run("toy-grasp", model="grasp"),
        run("toy-full", eval_negatives="all"),
        run("toy-seed7", eval_seed=7),
        run("books-grasp", dataset="books", fingerprint="f00d" * 16, model="grasp", activation="softmax"),
        run("toy2-id", fingerprint="beef" * 16),  # another split that is also called "toy"
    ]
    plot, out = tmp_path / "chart.png", tmp_path / "cmp.md"
    assert main(["report", *map(str, runs), "--plot", str(plot), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.startswith("Note: these runs cover 3 datasets and 3 evaluation protocols, whose metrics are not "
                           "comparable; they are split into 5 groups below, each with its own table and chart "
                           "panel.")  # fmt: skip
    sections = {part.split("\n", 1)[0]: part for part in text.split("\n## ")[1:]}
    sampled = "target + 100 sampled negatives, eval seed 2025"
    assert list(sections) == [
        f"toy (data abc): {sampled}",
        f"books: {sampled}",
        "toy (data abc): full ranking over all items",
        "toy (data abc): target + 100 sampled negatives, eval seed 7",
        f"toy (data beefbeef): {sampled}",
    ]
    rows = {title: [line.split(" | ")[0][2:] for line in part.splitlines() if line.startswith("| ")][1:]
            for title, part in sections.items()}  # fmt: skip
    assert list(rows.values()) == [["toy-id", "toy-grasp"], ["books-id", "books-grasp"], ["toy-full"],
                                   ["toy-seed7"], ["toy2-id"]]  # fmt: skip
    assert "| books-grasp | SASRec + GRASP (softmax) | 1 |" in sections[f"books: {sampled}"]

    fig = comparison_figure(group_runs(runs))
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [g.title for g in group_runs(runs)] == list(sections)
    assert _legend(axes[0]) == ["SASRec", "SASRec + GRASP"]
    assert _legend(axes[1]) == ["SASRec", "SASRec + GRASP (softmax)"]
    assert _legend(axes[2]) == ["SASRec"]


def test_single_run_chart_has_overall_head_and_tail_bars(tmp_path):
    metrics = _fake_metrics(42, model="grasp")
    metrics["config"]["max_len"] = 50
    single = _write_run(tmp_path / "only", metrics)
    for s in (1, 2):
        _write_run(tmp_path / "multi" / f"seed{s}", _fake_metrics(s, model="llmesr"))

    fig = comparison_figure(group_runs([single]))
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["overall", "tail users", "head users", "tail items",
                                                           "head items"]  # fmt: skip
    (bars,) = _bars(ax)
    assert [b.get_height() for b in bars] == pytest.approx([metrics["test"][g]["NDCG@10"] for g in GROUPS])
    assert bars.errorbar is None  # one seed: no spread
    assert ax.get_title() == "toy: target + 100 sampled negatives, eval seed 2025\nevery run: max-len 50"
    assert _legend(ax) == ["SASRec + GRASP"]

    fig = comparison_figure(group_runs([single, tmp_path / "multi"]))
    one, two = _bars(fig.axes[0])
    summary = load_run(tmp_path / "multi")
    assert one.errorbar is None and two.errorbar is not None
    segments = two.errorbar.lines[2][0].get_segments()
    spread = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert spread == pytest.approx([summary["test"][g]["NDCG@10"]["std"] for g in GROUPS])
    assert "error bars: std over seeds" in fig.get_suptitle()


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
        config = TrainConfig(model="id", d=8, max_len=5, epochs=1, batch_size=16, eval_negatives=10, device="cpu",
                             seed=seed)  # fmt: skip
        train(tmp_path / "run" / f"seed{seed}", data, None, config, progress=False, model_factory=tiny_factory)
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "run"), str(tmp_path / "run" / "seed42"), "--plot", str(tmp_path / "p.png")]
    )
    assert report_main(args) == 0
    out = capsys.readouterr().out
    assert "| run | SASRec [run] | 2 |" in out and "| run/seed42 | SASRec [run/seed42] | 1 |" in out
    assert (tmp_path / "p.png").is_file()
