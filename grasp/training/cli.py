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
import contextlib
import copy
import json
import shlex
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from grasp._console import log_to, say
from grasp._io import write_json, write_text
from grasp.config_file import write_config
from grasp.data.preprocess import Dataset
from grasp.data.store import load_dataset
from grasp.pipeline.cli import add_stage_arguments, run_stages
from grasp.pipeline.stages import StageError
from grasp.pipeline.tables import Tables
from grasp.training.config import TrainConfig, add_train_arguments, with_later_fields
from grasp.training.report import write_report, write_summary
from grasp.training.rundir import check_same_setup, read_record, refuse_overwrite, table_hashes, texts_source

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


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    return read_record(run_dir / _RUN_FILE, ("config", "pipeline_dir", "seeds"))


def _read_metrics(seed_dir: Path) -> dict[str, Any] | None:
    path = seed_dir / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_run(run_dir: Path, record: dict[str, Any], force: bool) -> None:
    """Refuse a run directory made for another config, dataset location or LLM tables (unless ``force``)."""
    old = _read_record(run_dir)
    if old is None:
        return
    compared = [key for key in ("pipeline_dir", "tables") if key in record]  # the tables, once they are known
    check_same_setup(
        run_dir,
        {**with_later_fields(old["config"]), **{key: old.get(key) for key in compared}},
        {**record["config"], **{key: record[key] for key in compared}},
        kind="training config",
        force=force,
        notes={"tables": "the LLM tables (generate / embed / retrieve ran again with other inputs)"},
    )


def _load_tables(pipeline_dir: Path, dataset: Dataset) -> Tables:
    return Tables.load(pipeline_dir / "embeddings", num_users=dataset.num_users, num_items=dataset.num_items)


def _stages_on_rank0(
    args: argparse.Namespace, config: TrainConfig, pipeline_dir: Path, main_rank: bool
) -> tuple[Dataset, Tables | None]:
    """Run the missing stages (under torchrun on rank 0 only; the other ranks wait, then read the results).

    Rank 0 tells the others whether the stages succeeded, so an error there stops every rank at once
    instead of leaving them waiting at a barrier.
    """
    import torch.distributed as dist  # torch only once a command runs: `grasp --help` imports this module

    stage_args = copy.copy(args)
    stage_args.out, stage_args.force = pipeline_dir, False
    until = "prepare" if config.model == "id" or args.no_generate else "retrieve"
    error: BaseException | None = None
    if main_rank:
        try:
            dataset, tables = run_stages(stage_args, until)
            if config.model != "id" and tables is None:
                tables = _load_tables(pipeline_dir, dataset)
        except BaseException as failure:
            error = failure
    if dist.is_initialized():
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, src=0)
        if not main_rank:
            if status[0] is not None:
                raise StageError(f"rank 0 failed before training: {status[0]}")
            dataset = load_dataset(pipeline_dir / "data")
            tables = None if config.model == "id" else _load_tables(pipeline_dir, dataset)
    if error is not None:
        raise error
    return dataset, tables


def _check_pipeline_dir(args: argparse.Namespace, pipeline_dir: Path) -> None:
    """Without ``--dataset``, the stages read the dataset already prepared in the pipeline directory."""
    if getattr(args, "dataset", None) is not None or (pipeline_dir / "manifest.json").is_file():
        return
    if args.pipeline_dir is not None:
        state = "does not exist" if not pipeline_dir.exists() else "holds no prepared dataset (no manifest.json)"
        raise ValueError(f"--pipeline-dir {pipeline_dir}: {state}; give --dataset to prepare one there")
    raise ValueError(f"--dataset is required: {pipeline_dir} holds no prepared dataset yet")


def _holds_work(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything worth keeping: a finished stage or a training checkpoint."""
    manifest = run_dir / "manifest.json"
    return (manifest.is_file() and bool(json.loads(manifest.read_text(encoding="utf-8")).get("stages"))) or any(
        run_dir.glob("seed*/checkpoints/*")
    )


def _command_line(args: argparse.Namespace) -> str:
    return shlex.join(["grasp", *getattr(args, "argv", ["train"])])


def train_main(args: argparse.Namespace) -> int:
    """``grasp train``: stages, then one training run per seed, then the summary; returns the exit code.

    Everything that can be checked before work starts is checked first (flags, device, pipeline
    directory, an earlier run in the way), so a failed start leaves no run directory behind. Training
    writes ``RUN_DIR/train.log`` (every line printed, time-stamped) and ``RUN_DIR/config.toml`` (the
    resolved options, for ``--config``).
    """
    import torch.distributed as dist

    from grasp.training.trainer import check_device, join_process_group

    config = TrainConfig.from_args(args)
    seeds = args.seeds or [config.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds lists a seed twice: {' '.join(map(str, seeds))}")
    run_dir: Path = args.out
    pipeline_dir: Path = args.pipeline_dir or run_dir
    check_device(config.device)
    _check_pipeline_dir(args, pipeline_dir)
    defining = {k: v for k, v in config.run_defining().items() if k != "seed"}
    record = {"config": defining, "pipeline_dir": str(pipeline_dir.resolve())}
    _check_run(run_dir, record, args.force)
    for seed in seeds:
        refuse_overwrite(run_dir / f"seed{seed}", resume=args.resume, force=args.force)

    created = not run_dir.exists()
    owns_group = join_process_group(config.device)
    main_rank = not dist.is_initialized() or dist.get_rank() == 0
    log = log_to(run_dir / "train.log", _command_line(args)) if main_rank else contextlib.nullcontext()
    try:
        with log:
            _train_seeds(args, config, seeds, run_dir, pipeline_dir, record, main_rank)
    except BaseException:
        if created and main_rank and not _holds_work(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves no half-made run directory
        raise
    finally:
        if owns_group:
            dist.destroy_process_group()
    return 0


def _train_seeds(
    args: argparse.Namespace,
    config: TrainConfig,
    seeds: list[int],
    run_dir: Path,
    pipeline_dir: Path,
    record: dict[str, Any],
    main_rank: bool,
) -> None:
    """The body of :func:`train_main`: stages, the seeds, the summary (under the run's log file)."""
    from grasp.training.trainer import train

    try:
        dataset, tables = _stages_on_rank0(args, config, pipeline_dir, main_rank)
        record["tables"] = table_hashes(pipeline_dir) if tables is not None else None
        record["texts"] = texts_source(pipeline_dir)  # what the report names the run by
        _check_run(run_dir, record, args.force)  # again, now that the tables are known
        all_seeds = seeds
        if main_rank:
            old = _read_record(run_dir)
            earlier = old["seeds"] if old and old["config"] == record["config"] and not args.force else []
            all_seeds = sorted(set(earlier) | set(seeds))
            write_json(run_dir / _RUN_FILE, {**record, "seeds": all_seeds})
            if getattr(args, "command_parser", None) is not None:
                header = f"{_command_line(args)}\nrepeat with: grasp train --config THIS_FILE --out OTHER_DIR"
                write_config(run_dir / "config.toml", args.command_parser, args, header)
        finished = {}
        for seed in seeds:
            if len(seeds) > 1 and main_rank:
                say(f"seed {seed}: {run_dir / f'seed{seed}'}")
            finished[seed] = train(run_dir / f"seed{seed}", dataset, tables, replace(config, seed=seed),
                                   resume=args.resume, progress=not args.no_progress, force=args.force)  # fmt: skip
    except KeyboardInterrupt:
        if main_rank:
            say("interrupted (Ctrl-C); finished stages and epochs are kept", echo=False)
        raise
    if main_rank:
        # The summary covers every seed this directory holds, also those of earlier commands.
        results = [finished.get(seed) or _read_metrics(run_dir / f"seed{seed}") for seed in all_seeds]
        results = [r for r in results if r is not None]
        if len(results) == 1:
            write_json(run_dir / "metrics.json", results[0])
            report = write_report(run_dir, results[0])
        else:
            write_summary(run_dir, results)
            report = run_dir / "report.md"
        say(report.read_text(encoding="utf-8"))


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``grasp evaluate RUN_DIR``."""
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a directory written by `grasp train`")
    parser.add_argument("--checkpoint", choices=("best", "last"), default="best", help="which weights (default best)")
    parser.add_argument("--eval-negatives", help="override the run's setting: a count, or 'all' for full ranking")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to evaluate")
    parser.add_argument("--eval-batch-size", type=int, help="users per evaluation batch (default: the run's)")


def _evaluated_seeds(run_dir: Path) -> tuple[Path, dict[str, Any], list[int]]:
    """The run directory, its record and the seeds ``grasp evaluate RUN_DIR`` evaluates.

    ``RUN_DIR`` may also be one seed's directory (``RUN/seed42``): then only that seed is evaluated.
    """
    record = _read_record(run_dir)
    if record is not None:
        return run_dir, record, list(record["seeds"])
    parent = _read_record(run_dir.parent) if run_dir.name.startswith("seed") else None
    if parent is not None and (run_dir / "config.json").is_file():
        seed = int(run_dir.name[len("seed"):])
        return run_dir.parent, parent, [seed]
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such directory; give a directory written by `grasp train --out`")
    raise FileNotFoundError(f"{run_dir}: not a run directory of `grasp train` (no {_RUN_FILE}); give the "
                            "directory passed to `grasp train --out`, or one of its seed<N> directories")  # fmt: skip


def evaluate_main(args: argparse.Namespace) -> int:
    """``grasp evaluate``: re-evaluate every seed of a finished run (or one seed) on test, print the tables
    and save them in each seed's ``evaluations/`` (the mean ± std of several seeds in ``RUN_DIR/evaluations``)."""
    from grasp.training.config import parse_eval_negatives
    from grasp.training.report import aggregate, metrics_tables
    from grasp.training.trainer import evaluate_run, evaluation_name

    run_dir, record, seeds = _evaluated_seeds(args.run_dir)
    pipeline_dir = Path(record["pipeline_dir"])
    dataset = load_dataset(pipeline_dir / "data")
    tables = None if record["config"]["model"] == "id" else _load_tables(pipeline_dir, dataset)
    if tables is not None and record.get("tables") != table_hashes(pipeline_dir):
        raise ValueError(f"{pipeline_dir}: the LLM tables changed since {run_dir} was trained; evaluating its "
                         "checkpoints with them would mix two sets of tables")  # fmt: skip
    negatives = None if args.eval_negatives is None else parse_eval_negatives(args.eval_negatives)
    results = []
    for seed in seeds:
        seed_dir = run_dir / f"seed{seed}"
        say(f"## {seed_dir}")
        results.append(evaluate_run(seed_dir, dataset, tables, checkpoint=args.checkpoint, device=args.device,
                                    eval_negatives=negatives, batch_size=args.eval_batch_size))  # fmt: skip
        name = evaluation_name(args.checkpoint, results[-1]["eval_negatives"], results[-1]["config"]["eval_seed"])
        say(f"saved {seed_dir / 'evaluations' / name}.json and .md")
    if len(results) > 1:
        summary = aggregate(results)
        path = write_json(run_dir / "evaluations" / f"{name}.json", summary)
        write_text(path.with_suffix(".md"), metrics_tables(summary))
        say(f"## {run_dir}: mean ± std over seeds {', '.join(map(str, seeds))}\n{metrics_tables(summary)}")
        say(f"saved {path} and {path.with_suffix('.md').name}")
    return 0
