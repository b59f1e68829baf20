"""Training and evaluation of the recommenders (docs/design.md sections 6 to 8).

:func:`train` runs one model in one run directory (early stopping, checkpoints, resume, DDP under
torchrun); :func:`evaluate_run` re-evaluates a finished run; :mod:`grasp.training.report` aggregates seeds
and compares runs.
"""

from grasp.training.config import TrainConfig, add_train_arguments
from grasp.training.evaluate import compute_ranks, evaluate_split, load_or_create_eval_negatives, sample_eval_negatives
from grasp.training.metrics import GROUPS, KS, group_metrics, ranking_metrics
from grasp.training.report import (
    add_report_arguments,
    aggregate,
    compare_runs,
    load_run,
    report_main,
    write_report,
    write_summary,
)
from grasp.training.trainer import build_recommender, evaluate_run, train

__all__ = [
    "TrainConfig",
    "add_train_arguments",
    "train",
    "evaluate_run",
    "build_recommender",
    "compute_ranks",
    "evaluate_split",
    "load_or_create_eval_negatives",
    "sample_eval_negatives",
    "ranking_metrics",
    "group_metrics",
    "GROUPS",
    "KS",
    "write_report",
    "aggregate",
    "write_summary",
    "load_run",
    "compare_runs",
    "add_report_arguments",
    "report_main",
]
