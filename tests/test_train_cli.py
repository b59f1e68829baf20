"""`grasp train`, `grasp evaluate` and `grasp report` end to end on small synthetic data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grasp.cli import main
from grasp.pipeline import Manifest

DATA = ["--dataset", "synthetic", "--synthetic-users", "150", "--synthetic-items", "200"]
FAST = [
    "--epochs",
    "2",
    "--hidden-size",
    "16",
    "--max-len",
    "20",
    "--eval-negatives",
    "30",
    "--no-progress",
    "--device",
    "cpu",
    "--model",  # the plain backbone unless a test names another model (a later --model wins)
    "id",
]


def test_train_id_runs_only_prepare_and_writes_outputs(tmp_path, capsys):
    run = tmp_path / "id"
    assert main(["train", "--out", str(run), *DATA, *FAST]) == 0
    out = capsys.readouterr().out
    assert "# sasrec / id on synthetic" in out
    assert list(Manifest(run).data["stages"]) == ["prepare"]  # no LLM tables for the plain backbone
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["config"]["model"] == "id" and metrics["epochs"] == 2
    assert set(metrics["test"]) == {"overall", "tail_user", "head_user", "tail_item", "head_item"}
    assert 0 <= metrics["test"]["overall"]["NDCG@10"] <= metrics["test"]["overall"]["HR@10"] <= 100
    for name in ("metrics.json", "epochs.csv", "report.md", "checkpoints/best.safetensors", "eval_negatives.npz"):
        assert (run / "seed42" / name).is_file(), name


def test_train_grasp_seeds_summary_evaluate_and_report(tmp_path, capsys, hash_encoder):
    shared = tmp_path / "pipeline"
    runs = []
    for model in ("grasp", "llmesr"):
        run = tmp_path / model
        argv = ["train", "--out", str(run), "--pipeline-dir", str(shared), *DATA, *FAST, "--model", model]
        assert main([*argv, "--seeds", "1", "2"]) == 0
        runs.append(run)
    out = capsys.readouterr().out
    assert out.count("retrieve: running") == 1  # the second model reuses the shared tables
    # where the descriptions came from, for the report's labels
    texts = json.loads((tmp_path / "grasp" / "train.json").read_text())["texts"]
    assert texts == {"generator": "template", "model": None, "hallucination_rate": 0.0}
    summary = json.loads((tmp_path / "grasp" / "metrics.json").read_text())
    assert summary["seeds"] == [1, 2] and set(summary["test"]["overall"]["NDCG@10"]) == {"mean", "std"}
    per_seed = [json.loads((tmp_path / "grasp" / f"seed{s}" / "metrics.json").read_text()) for s in (1, 2)]
    mean = sum(m["test"]["overall"]["NDCG@10"] for m in per_seed) / 2
    assert summary["test"]["overall"]["NDCG@10"]["mean"] == pytest.approx(mean)

    assert main(["evaluate", str(tmp_path / "grasp")]) == 0
    evaluated = capsys.readouterr().out
    assert f"{per_seed[0]['test']['overall']['NDCG@10']:.2f}" in evaluated  # the best checkpoint reproduces

    plot = tmp_path / "chart.png"
    assert main(["report", *map(str, runs), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "grasp" in table and "llmesr" in table and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backbone", "transformer"], "invalid choice: 'transformer'"),
        (["--model", "id", "--activation", "softmax"], "--activation only appl"),
        (["--model", "grasp", "--no-attention", "--activation", "softmax"], "incompatible"),
        (["--seeds", "1", "1"], "--seeds lists a seed twice"),
        (["--model", "grasp", "--no-generate"], "user.npy: missing; run `grasp embed`"),
    ],
)
def test_bad_flags_fail_before_training(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    try:
        code = main(["train", "--out", str(run), *DATA, *FAST, *argv])
    except SystemExit as exit_:  # argparse rejects unknown choices itself
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(run.glob("seed*"))  # nothing trained


def test_run_dir_of_another_config_needs_force(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *DATA, *FAST]) == 0
    assert main(["train", "--out", str(run), *DATA, *FAST, "--d", "8"]) == 2
    assert "belongs to a different training config (d: 16 -> 8)" in capsys.readouterr().err
    assert main(["train", "--out", str(run), *DATA, *FAST, "--d", "8", "--force"]) == 0
    assert json.loads((run / "metrics.json").read_text())["config"]["d"] == 8


def test_run_of_a_version_before_adapter_init_resumes_and_reports(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *DATA, *FAST, "--model", "grasp", "--epochs", "1"]) == 0
    for path in run.rglob("*.json"):  # the files as a grasp without --adapter-init wrote them
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "adapter_init" in record.get("config", {}):
            del record["config"]["adapter_init"]
            path.write_text(json.dumps(record))
    assert main(["train", "--out", str(run), *DATA, *FAST, "--model", "grasp", "--epochs", "2", "--resume"]) == 0
    assert json.loads((run / "metrics.json").read_text())["config"]["adapter_init"] == "random"
    assert main(["train", "--out", str(run), *DATA, *FAST, "--model", "grasp", "--adapter-init", "pca"]) == 2
    assert "belongs to a different training config (adapter_init: 'random' -> 'pca')" in capsys.readouterr().err


def test_resume_gives_the_uninterrupted_result(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "--out", str(straight), *DATA, *FAST, "--epochs", "3"]) == 0
    assert main(["train", "--out", str(resumed), *DATA, *FAST, "--epochs", "1"]) == 0  # "interrupted" after 1
    assert main(["train", "--out", str(resumed), *DATA, *FAST, "--epochs", "3", "--resume"]) == 0
    a, b = (json.loads((run / "metrics.json").read_text()) for run in (straight, resumed))
    assert a["epochs"] == b["epochs"] == 3
    assert a["test"] == b["test"] and a["valid"] == b["valid"]


def test_torchrun_two_processes(tmp_path):
    """The same command under torchrun (2 CPU processes, gloo): rank 0 prepares, both train, one report."""
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "grasp.cli", "train", "--out", str(run), *DATA, *FAST, "--batch-size", "32"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert result.stdout.count("# sasrec / id on synthetic") == 1  # only rank 0 reports


def test_seeds_added_later_join_the_summary(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *DATA, *FAST, "--seeds", "1"]) == 0
    assert main(["train", "--out", str(run), *DATA, *FAST, "--seeds", "2"]) == 0
    summary = json.loads((run / "metrics.json").read_text())
    record = json.loads((run / "train.json").read_text())
    assert summary["seeds"] == [1, 2] and record["seeds"] == [1, 2]
    assert record["texts"] is None  # the id model: no descriptions


def test_changed_tables_need_force(tmp_path, capsys, hash_encoder):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), *DATA, *FAST, "--model", "grasp"]
    assert main(argv) == 0
    assert main([*argv, "--k", "4", "--resume"]) == 2  # retrieve runs again with another k: other tables
    assert "the LLM tables (generate / embed / retrieve ran again" in capsys.readouterr().err


def test_torchrun_failure_on_rank0_stops_every_rank(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "grasp.cli", "train", "--out", str(tmp_path / "run"), "--dataset", "recbole", *FAST]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "--data-dir" in result.stderr and "rank 0 failed before training" in result.stderr
