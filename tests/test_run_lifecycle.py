"""The run lifecycle through the CLI: no silent overwrite, resume hints, logs, config files, messages."""

from __future__ import annotations

import json
import shlex

import pytest
import tomllib
import torch

from grasp.cli import build_parser, main, parse_args
from grasp.training import trainer

DATA = ["--dataset", "synthetic", "--synthetic-users", "120", "--synthetic-items", "150"]
FAST = ["--epochs", "2", "--hidden-size", "16", "--max-len", "20", "--eval-negatives", "30", "--no-progress",
        "--device", "cpu", "--model", "id"]  # fmt: skip


def _train(run, *extra: str) -> int:
    return main(["train", "--out", str(run), *DATA, *FAST, *extra])


def _metrics(path) -> dict:
    return json.loads((path / "metrics.json").read_text())


def test_default_model_is_grasp():
    args = build_parser().parse_args(["train", "--out", "runs/x", *DATA])
    assert args.model == "grasp"


def test_rerun_without_resume_is_refused_and_keeps_the_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run) == 0
    checkpoint = (run / "seed42" / "checkpoints" / "best.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(run) == 2
    err = capsys.readouterr().err
    assert "seed42 already holds a finished run" in err and "--resume" in err and "--force" in err
    assert err.count("\n") == 1  # one line
    assert (run / "seed42" / "checkpoints" / "best.safetensors").read_bytes() == checkpoint
    assert _train(run, "--resume") == 0  # a finished run is only re-evaluated
    assert _metrics(run)["epochs"] == 2


def test_force_starts_over_without_leftovers(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "3") == 0
    assert _train(run, "--epochs", "1", "--force") == 0
    assert _metrics(run)["epochs"] == 1
    assert len((run / "seed42" / "epochs.csv").read_text().splitlines()) == 2  # header + the new epoch only


def test_interrupt_names_the_command_that_resumes(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    save_last = trainer._Trainer._save_last

    def interrupted(self):  # Ctrl-C right after epoch 1's checkpoint
        save_last(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Trainer, "_save_last", interrupted)
    assert _train(run, "--force") == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and err.count("\n") == 2
    command = err.splitlines()[1].strip()
    assert command.startswith("grasp train ") and command.endswith("--resume") and "--force" not in command
    assert "interrupted (Ctrl-C)" in (run / "train.log").read_text()

    monkeypatch.setattr(trainer._Trainer, "_save_last", save_last)
    assert _train(run) == 2  # the interrupted run is not overwritten either
    assert "interrupted after epoch 1" in capsys.readouterr().err
    assert main(shlex.split(command)[1:]) == 0
    assert _metrics(run)["epochs"] == 2 and "resuming after epoch 1" in capsys.readouterr().out


def test_train_log_and_epoch_lines_without_progress(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--epochs", "3", "--patience", "1", "--lr", "1e-9") == 0  # no gain after epoch 1
    out, err = capsys.readouterr()
    assert "epoch 1: loss" in out and "early stop" in out
    assert "\r" not in out + err
    log = (run / "train.log").read_text()
    first = log.splitlines()[0]
    assert "grasp train --out" in first and "--patience 1" in first
    for text in ("[grasp] prepare: done in", "epoch 1: loss", "epoch 2: loss", "early stop: no validation NDCG@10 gain",
                 "## Test metrics"):  # fmt: skip
        assert text in log, text
    assert "\r" not in log


def test_progress_is_plain_when_stderr_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    import grasp._console as console

    monkeypatch.setattr(console, "PLAIN_INTERVAL", 0.0)  # a line on every update
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *DATA, *(flag for flag in FAST if flag != "--no-progress")]) == 0
    err = capsys.readouterr().err
    assert "epoch 1: 1/" in err and "batch" in err
    assert "\r" not in err


def test_missing_pipeline_dir_is_named(tmp_path, capsys):
    assert main(["train", "--pipeline-dir", str(tmp_path / "nothere"), "--out", str(tmp_path / "x"), *FAST]) == 2
    err = capsys.readouterr().err
    assert f"--pipeline-dir {tmp_path / 'nothere'}: does not exist" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_failed_start_leaves_no_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--device", "cuda") == 2
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err
    assert not run.exists()


def test_failure_after_a_stage_keeps_the_prepared_data(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--model", "grasp", "--no-generate") == 2
    assert "run `grasp embed`" in capsys.readouterr().err
    assert (run / "manifest.json").is_file() and not list(run.glob("seed*"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epoch", "3"], "grasp train: error: unrecognized arguments: --epoch 3; did you mean --epochs?"),
        (["train", "--hidden-siz", "8"], "did you mean --hidden-size?"),
        (["trian", "--out", "x"], "grasp: error: unknown command 'trian'; did you mean train?"),
        (["evaluate", "runs/x", "--checkpont", "last"], "grasp evaluate: error: unrecognized arguments"),
    ],
)
def test_mistyped_flags_and_commands(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluate_saves_results_and_takes_a_seed_directory(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--seeds", "1", "2") == 0
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    for seed in (1, 2):
        saved = json.loads((run / f"seed{seed}" / "evaluations" / "best-sampled30-seed2025.json").read_text())
        assert saved["test"] == _metrics(run / f"seed{seed}")["test"]  # the best checkpoint reproduces
    summary = json.loads((run / "evaluations" / "best-sampled30-seed2025.json").read_text())
    assert summary["seeds"] == [1, 2] and (run / "evaluations" / "best-sampled30-seed2025.md").is_file()
    capsys.readouterr()
    assert main(["evaluate", str(run / "seed2"), "--eval-negatives", "all", "--checkpoint", "last"]) == 0
    out = capsys.readouterr().out
    assert f"## {run / 'seed2'}" in out and f"## {run / 'seed1'}" not in out and "full ranking" in out
    assert (run / "seed2" / "evaluations" / "last-full.json").is_file()
    assert not (run / "seed1" / "evaluations" / "last-full.json").exists()


def test_evaluate_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path)]) == 2
    assert f"{tmp_path}: not a run directory of `grasp train`" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothere")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_config_file_sets_options_and_the_command_line_wins(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(
        'dataset = "synthetic"\nsynthetic-users = 120\nsynthetic-items = 150\nmodel = "id"\ndevice = "cpu"\n'
        "[training]\nepochs = 3\nbatch_size = 64\n[architecture]\nhidden-size = 8\nmax-len = 20\n"
        '[evaluation]\neval-negatives = "30"\n'
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(run), "--epochs", "1", "--no-progress"]) == 0
    used = _metrics(run)["config"]
    assert (used["epochs"], used["batch_size"], used["d"], used["eval_negatives"]) == (1, 64, 8, 30)

    resolved = tomllib.loads((run / "config.toml").read_text())  # one table per help group of `grasp train`
    assert resolved["out"] == str(run) and resolved["training"]["epochs"] == 1 and resolved["model"]["model"] == "id"
    assert resolved["model"]["hidden-size"] == 8 and resolved["dataset"]["synthetic-users"] == 120
    assert "resume" not in resolved["run"] and "force" not in resolved and "no-progress" not in resolved
    again = tmp_path / "again"
    assert main(["train", "--config", str(run / "config.toml"), "--out", str(again), "--no-progress"]) == 0
    assert _metrics(again)["test"] == _metrics(run)["test"]  # the resolved config repeats the run


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch = 3\n", "'epoch' is not an option of `grasp train` (did you mean 'epochs'?)"),
        ('epochs = "many"\n', "epochs: must be an integer, got 'many'"),
        ("epochs = 1.5\n", "epochs: not a valid value: 1.5"),
        ('backbone = "transformer"\n', "backbone: must be one of sasrec"),
        ('hae-branches = "self"\n', "hae-branches: must be a list"),
        ("epochs = [\n", "not a TOML file"),
        ("epochs = 2\n[model]\nepochs = 3\n", "'epochs' is set twice"),
    ],
)
def test_bad_config_files(tmp_path, capsys, text, message):
    config = tmp_path / "exp.toml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"grasp train: error: {config}" in err and message in err
    assert not (tmp_path / "run").exists()


def test_negated_switch_in_a_config_file(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text("no-attention = true\n")
    assert parse_args(build_parser(), ["train", "--config", str(config), "--out", "x"]).attention is False
    config.write_text("attention = false\n")
    assert parse_args(build_parser(), ["train", "--config", str(config), "--out", "x"]).attention is False
