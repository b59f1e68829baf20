"""``grasp train`` and ``grasp evaluate``: the main job, from a dataset to a trained model and its report.

``grasp train --out RUN_DIR ...`` runs whatever offline stage is missing (prepare; and for the LLM
models generate, embed and retrieve), then trains one model per seed in ``RUN_DIR/seed<S>`` and writes
``RUN_DIR/metrics.json`` and ``RUN_DIR/report.md`` (one seed: that seed's metrics; several: mean ± std).
The stages live in ``--pipeline-dir`` (default: ``RUN_DIR`` itself), so several models can share one
prepared dataset and one set of LLM tables. Under ``torchrun`` rank 0 runs the stages while the other
ranks wait, then every rank trains data-parallel.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from grasp._io import write_json
from grasp.data.store import load_dataset
from grasp.pipeline.cli import add_stage_arguments, run_stages
from grasp.pipeline.tables import Tables
from grasp.training.config import TrainConfig, add_train_arguments
from grasp.training.report import write_report, write_summary

__all__ = ["add_train_command_arguments", "train_main", "add_evaluate_arguments", "evaluate_main"]

_RUN_FILE = "train.json"


def add_train_command_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option of ``grasp train``: the run, the stages before training, and training itself."""
    add_stage_arguments(parser, "retrieve")
    add_train_arguments(parser)
    group = parser.add_argument_group("run")
    group.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                       help="one run per seed in RUN_DIR/seed<SEED>; report mean ± std (default: --seed)")  # fmt: skip
    group.add_argument("--pipeline-dir", type=Path,
                       help="run directory of the prepare/generate/embed/retrieve stages (default: --out), "
                       "to share one dataset and one set of LLM tables between models")  # fmt: skip
    group.add_argument("--no-generate", action="store_true",
                       help="never run generate/embed/retrieve: the LLM tables must already exist")  # fmt: skip
    group.add_argument("--resume", action="store_true",
                       help="continue interrupted seeds from their last checkpoint")  # fmt: skip


def _check_run(run_dir: Path, record: dict[str, Any], force: bool) -> None:
    """Refuse a run directory that was made for another config (unless ``force``)."""
    path = run_dir / _RUN_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = sorted(
        k for k in set(old["config"]) | set(record["config"]) if old["config"].get(k) != record["config"].get(k)
    )
    if old.get("pipeline_dir") != record["pipeline_dir"]:
        diff.append("pipeline_dir")
    if diff and not force:
        details = ", ".join(f"{k}: {old['config'].get(k, old.get(k))!r} -> {record['config'].get(k, record.get(k))!r}"
                            for k in diff)  # fmt: skip
        raise ValueError(
            f"{run_dir} belongs to a different training config ({details}); use another --out, or --force to "
            f"train this config there"
        )


def _init_distributed(config: TrainConfig) -> bool:
    """Join the torchrun process group early, so rank 0 alone runs the stages; True when this call made it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def train_main(args: argparse.Namespace) -> int:
    """``grasp train``: stages, then one training run per seed, then the summary; returns the exit code."""
    from grasp.training.trainer import train

    config = TrainConfig.from_args(args)
    seeds = args.seeds or [config.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {' '.join(map(str, seeds))}")
    run_dir: Path = args.out
    pipeline_dir: Path = args.pipeline_dir or run_dir
    defining = {k: v for k, v in config.run_defining().items() if k != "seed"}
    record = {"config": defining, "pipeline_dir": str(pipeline_dir.resolve())}
    _check_run(run_dir, record, args.force)

    owns_group = _init_distributed(config)
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    try:
        stage_args = copy.copy(args)
        stage_args.out, stage_args.force = pipeline_dir, False
        until = "prepare" if config.model == "id" or args.no_generate else "retrieve"
        if not main_rank:
            dist.barrier()  # wait for rank 0 to finish the stages, then read what it wrote
        dataset, tables = run_stages(stage_args, until)
        if main_rank and dist.is_initialized():
            dist.barrier()
        if config.model != "id" and tables is None:
            tables = Tables.load(pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
        if main_rank:
            write_json(run_dir / _RUN_FILE, {**record, "seeds": seeds})
        results = []
        for seed in seeds:
            results.append(
                train(
                    run_dir / f"seed{seed}",
                    dataset,
                    tables,
                    replace(config, seed=seed),
                    resume=args.resume,
                    progress=not args.no_progress,
                    force=args.force,
                )  # fmt: skip
            )
        if main_rank:
            if len(results) == 1:
                write_json(run_dir / "metrics.json", results[0])
                report = write_report(run_dir, results[0])
            else:
                write_summary(run_dir, results)
                report = run_dir / "report.md"
            print(report.read_text(encoding="utf-8"))
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``grasp evaluate RUN_DIR``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `grasp train`")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which weights (default best)")
    parser.add_argument("--eval-negatives", help="override the run's setting: a count, or 'all' for full ranking")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to evaluate")
    parser.add_argument("--eval-batch-size", type=int, help="users per evaluation batch (default: the run's)")


def evaluate_main(args: argparse.Namespace) -> int:
    """``grasp evaluate``: re-evaluate every seed of a finished run on test and print the tables."""
    from grasp.training.config import parse_eval_negatives
    from grasp.training.trainer import evaluate_run

    run_dir: Path = args.run_dir
    path = run_dir / _RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; is {run_dir} a directory written by `grasp train`?")
    record = json.loads(path.read_text(encoding="utf-8"))
    pipeline_dir = Path(record["pipeline_dir"])
    dataset = load_dataset(pipeline_dir / "data")
    tables = None
    if record["config"]["model"] != "id":
        tables = Tables.load(pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)
    negatives = None if args.eval_negatives is None else parse_eval_negatives(args.eval_negatives)
    for seed in record["seeds"]:
        print(f"## {run_dir / f'seed{seed}'}")
        evaluate_run(run_dir / f"seed{seed}", dataset, tables, checkpoint=args.checkpoint, device=args.device,
                     eval_negatives=negatives, batch_size=args.eval_batch_size)  # fmt: skip
    return 0
