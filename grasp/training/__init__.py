"""Training and evaluation of the recommenders (docs/design.md sections 6 to 8).

:func:`train` runs one model in one run directory (early stopping, checkpoints, resume, DDP under
torchrun); :func:`evaluate_run` re-evaluates a finished run; :mod:`grasp.training.report` aggregates seeds
and compares runs.
"""

from grasp import _lazy

#: Imported on first use: the trainer imports torch; the command line needs only the config and the report.
_EXPORTS = {
    "grasp.training.config": ("TrainConfig", "add_train_arguments"),
    "grasp.training.trainer": ("train", "evaluate_run", "build_recommender"),
    "grasp.training.evaluate": (
        "compute_ranks",
        "evaluate_split",
        "load_or_create_eval_negatives",
        "sample_eval_negatives",
    ),
    "grasp.training.metrics": ("ranking_metrics", "group_metrics", "GROUPS", "KS"),
    "grasp.training.report": (
        "write_report",
        "aggregate",
        "write_summary",
        "load_run",
        "compare_runs",
        "add_report_arguments",
        "report_main",
    ),
}
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__, __dir__ = _lazy.lazy_exports(__name__, _EXPORTS)
