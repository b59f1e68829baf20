"""The ``grasp`` command line: ``info``, the pipeline stages, ``train``, ``evaluate``, ``recommend`` and ``report``."""

from __future__ import annotations

import argparse
import os
import sys

_STAGE_HELP = {
    "prepare": "load a dataset, filter, remap and split it, and print its statistics",
    "generate": "write a description of every item and user (template or an OpenAI-compatible LLM)",
    "embed": "embed the descriptions into the U and I tables",
    "retrieve": "average each user's and item's top-k neighbours into U_sim and I_sim",
}


def _info(args: argparse.Namespace) -> int:
    from grasp.info import report

    print(report())
    return 0


def _stage(args: argparse.Namespace) -> int:
    from grasp.pipeline.cli import run_stages

    run_stages(args, args.command)
    return 0


def _train(args: argparse.Namespace) -> int:
    from grasp.training.cli import train_main

    return train_main(args)


def _evaluate(args: argparse.Namespace) -> int:
    from grasp.training.cli import evaluate_main

    return evaluate_main(args)


def _recommend(args: argparse.Namespace) -> int:
    from grasp.inference.cli import recommend_main

    return recommend_main(args)


def _report(args: argparse.Namespace) -> int:
    from grasp.training.report import report_main

    return report_main(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``grasp`` subcommand."""
    from grasp.inference.cli import add_recommend_arguments
    from grasp.pipeline.cli import add_stage_arguments
    from grasp.training.cli import add_evaluate_arguments, add_train_command_arguments
    from grasp.training.report import add_report_arguments

    parser = argparse.ArgumentParser(prog="grasp", description="GRASP for sequential recommenders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices, and which backends of each op are available")
    info.set_defaults(func=_info)
    for stage, text in _STAGE_HELP.items():
        command = sub.add_parser(stage, help=text, description=text + ". Earlier stages that are missing run first.")
        add_stage_arguments(command, stage)
        command.set_defaults(func=_stage)
    train = sub.add_parser(
        "train",
        help="train a model end to end (runs any missing stage first) and write metrics.json and report.md",
        description="Train a sequential recommender end to end: runs every missing stage (prepare; for the LLM "
        "models also generate, embed, retrieve), trains once per seed with early stopping, tests the best "
        "checkpoint and writes RUN_DIR/metrics.json and RUN_DIR/report.md.",
    )
    add_train_command_arguments(train)
    train.set_defaults(func=_train)
    evaluate = sub.add_parser("evaluate", help="re-evaluate a trained run's checkpoints on test")
    add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=_evaluate)
    recommend = sub.add_parser(
        "recommend",
        help="write every user's top-k items from a trained run (CSV, JSON lines or Parquet)",
        description="Recommend with a trained run: each user's top-k items as the next item after the whole "
        "history, in the dataset's original ids, streamed to --out.",
    )
    add_recommend_arguments(recommend)
    recommend.set_defaults(func=_recommend)
    report = sub.add_parser("report", help="compare runs in one markdown table and a PNG chart of head/tail NDCG@10")
    add_report_arguments(report)
    report.set_defaults(func=_report)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input or environment: one line, no traceback."""
    from grasp.data.core import DataError
    from grasp.data.download import DownloadError
    from grasp.embedding.encoders import EmbeddingError
    from grasp.pipeline.stages import StageError
    from grasp.training.checkpoint import CheckpointError

    return (DataError, DownloadError, StageError, EmbeddingError, CheckpointError, ValueError, FileNotFoundError,
            ImportError, FloatingPointError)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grasp`` console script.

    Errors in the user's input or environment print one line (``grasp CMD: error: ...``) and exit 2;
    ``GRASP_DEBUG=1`` shows the traceback instead.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _expected_errors() as error:
        if os.environ.get("GRASP_DEBUG"):
            raise
        print(f"grasp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grasp {args.command}: interrupted; finished stages and cached requests are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
