"""The ``grasp`` command line: ``info``, the pipeline stages, ``train``, ``evaluate``, ``recommend`` and ``report``."""

from __future__ import annotations

import argparse
import difflib
import os
import shlex
import sys
from pathlib import Path

_STAGE_HELP = {
    "prepare": "load a dataset, filter, remap and split it, and print its statistics",
    "generate": "write a description of every item and user (template or an OpenAI-compatible LLM)",
    "embed": "embed the descriptions into the U and I tables",
    "retrieve": "average each user's and item's top-k neighbours into U_sim and I_sim",
}


def _info(args: argparse.Namespace) -> int:
    from grasp.info import report_lines

    for line in report_lines():
        print(line, flush=True)  # each line as it comes: the versions before torch is imported
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


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviated flags: ``--epoch`` must not silently mean ``--epochs``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE.toml",
                        help="read options from a TOML file (`epochs = 50`, `hidden-size = 64`, ...); flags given "
                        "on the command line win; RUN_DIR/config.toml of a run repeats it")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``grasp`` subcommand."""
    from grasp.cache.cli import add_cache_arguments, cache_main
    from grasp.inference.cli import add_recommend_arguments
    from grasp.pipeline.cli import add_stage_arguments
    from grasp.training.cli import add_evaluate_arguments, add_train_command_arguments
    from grasp.training.report import add_report_arguments

    parser = _Parser(prog="grasp", description="GRASP for sequential recommenders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices, and which backends of each op are available")
    info.set_defaults(func=_info)
    for stage, text in _STAGE_HELP.items():
        command = sub.add_parser(stage, help=text, description=text + ". Earlier stages that are missing run first.")
        add_stage_arguments(command, stage)
        _add_config_argument(command)
        command.set_defaults(func=_stage)
    train = sub.add_parser(
        "train",
        help="train a model end to end (runs any missing stage first) and write metrics.json and report.md",
        description="Train a sequential recommender end to end: runs every missing stage (prepare; for the LLM "
        "models also generate, embed, retrieve), trains once per seed with early stopping, tests the best "
        "checkpoint and writes RUN_DIR/metrics.json and RUN_DIR/report.md.",
    )
    add_train_command_arguments(train)
    _add_config_argument(train)
    train.set_defaults(func=_train, command_parser=train)
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
    report = sub.add_parser(
        "report",
        help="compare runs in markdown tables (one per dataset and evaluation protocol) and a PNG chart of overall "
        "and head/tail NDCG@10",
    )
    add_report_arguments(report)
    report.set_defaults(func=_report)
    cache = sub.add_parser(
        "cache", help="show (info) or empty (clear) the cache of descriptions and embeddings shared by all runs"
    )
    add_cache_arguments(cache)
    cache.set_defaults(func=cache_main)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe a problem with the user's input or environment: one line, no traceback."""
    from grasp.data.core import DataError
    from grasp.data.download import DownloadError
    from grasp.embedding.encoders import EmbeddingError
    from grasp.llm.client import ServerError
    from grasp.pipeline.stages import StageError
    from grasp.training.checkpoint import CheckpointError

    return (DataError, DownloadError, StageError, EmbeddingError, CheckpointError, ServerError, ValueError,
            FileNotFoundError, ImportError, FloatingPointError)  # fmt: skip


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to reach the subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv`` with a subcommand's ``--config`` file applied first; errors name the subcommand.

    An unknown command or flag exits with a usage error (status 2) that suggests the closest spelling,
    from the subcommand's parser (``grasp train: error: ...``) rather than the top-level one.
    """
    from grasp.config_file import ConfigFileError, apply_config

    commands = _subcommands(parser)
    command = next((word for word in argv if not word.startswith("-")), None)
    if command is None or command not in commands:
        if command is not None:
            parser.error(f"unknown command {command!r}{_did_you_mean(command, list(commands))}")
        return parser.parse_args(argv)  # --help, or no command: argparse says what is missing
    sub = commands[command]
    config = next((argv[i + 1] for i, word in enumerate(argv[:-1]) if word == "--config"), None)
    config = config or next((word.split("=", 1)[1] for word in argv if word.startswith("--config=")), None)
    if config is not None and any(action.dest == "config" for action in sub._actions):
        try:
            apply_config(sub, Path(config))
        except ConfigFileError as error:
            sub.error(str(error))
    args, extras = parser.parse_known_args(argv)
    if extras:
        flags = [flag for action in sub._actions for flag in action.option_strings]
        unknown = extras[0].split("=", 1)[0]
        hint = _did_you_mean(unknown, flags) if unknown.startswith("-") else ""
        sub.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
    args.argv = argv
    return args


def _resume_command(argv: list[str]) -> str:
    """The ``grasp train`` command that continues an interrupted one."""
    return shlex.join(["grasp", *(word for word in argv if word not in ("--force", "--resume")), "--resume"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grasp`` console script.

    Errors in the user's input or environment print one line (``grasp CMD: error: ...``) and exit 2;
    ``GRASP_DEBUG=1`` shows the traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(build_parser(), argv)
    try:
        return args.func(args)
    except _expected_errors() as error:
        if os.environ.get("GRASP_DEBUG"):
            raise
        print(f"grasp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print(f"grasp train: interrupted; finished stages and epochs are kept. Continue with:\n"
                  f"  {_resume_command(argv)}", file=sys.stderr)  # fmt: skip
        else:
            print(f"grasp {args.command}: interrupted; finished stages and cached requests are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
