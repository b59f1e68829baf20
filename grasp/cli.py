"""The ``grasp`` command line: ``info``, the pipeline stages, ``train``, ``evaluate`` and ``report``."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``grasp`` subcommand."""
    from grasp.pipeline.cli import add_stage_arguments

    parser = argparse.ArgumentParser(prog="grasp", description="GRASP for sequential recommenders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="versions, devices, and which backends of each op are available")
    info.set_defaults(func=_info)
    for stage, text in _STAGE_HELP.items():
        command = sub.add_parser(stage, help=text, description=text + ". Earlier stages that are missing run first.")
        add_stage_arguments(command, stage)
        command.set_defaults(func=_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``grasp`` console script; errors in the user's input print one line and exit 2."""
    from grasp.data.loaders import DataError
    from grasp.pipeline.stages import StageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (DataError, StageError, ValueError, FileNotFoundError) as error:
        print(f"grasp {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grasp {args.command}: interrupted; finished stages and cached requests are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
