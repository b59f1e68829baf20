"""The one shape of the op benchmarks, and the parts of it they share (docs/design.md section 9).

Every ``benchmark_<op>.py`` reads in the same order:

1. ``parser()`` declares the common options, the script adds its own, ``pick_device()`` resolves
   ``--device``;
2. ``implementations(device, ...)`` builds what is compared, a dict name -> callable, and ``choose()``
   keeps those ``--impl`` names;
3. the cases: every shape (``shapes()``: each ``--shape``, else the ``--sizes`` set) at every dtype
   (``dtypes()``), each a ``Case`` with its settings as results-file columns and its table's heading;
4. a ``Benchmark`` subclass holds what is the op's own: a case's inputs (``setup``), what is timed of one
   implementation on them (``passes``: forward, backward, ...), and its extra columns (``columns``: GB/s,
   recall, ...). Its ``run()`` times every implementation side by side in this process as medians, case
   by case, prints one markdown table a case with the ratio to the named baseline, and appends the rows to
   ``benchmarks/results/<name>.csv`` unless ``--no-csv``.

The common options, spelled the same in every script: ``--device``, ``--dtype`` (where the op takes
one), ``--impl``, ``--shape`` and ``--sizes`` (the cases), ``--min-time`` and ``--no-csv``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from _timing import append_csv, git_commit, machine_name, markdown_table, median_ms, stamp

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16", "float32"]}
#: Named sets of shapes (``--sizes``), each a list of shapes for every device or a dict device -> list.
Sizes = dict[str, Any]


def parser(doc: str, *, impls: Sequence[str], shape: str, sizes: Sizes, dtype: bool = True) -> argparse.ArgumentParser:
    """The common options. ``impls``: every implementation name a device can have; ``shape``: the numbers
    of one ``--shape``, comma-separated, trailing optional ones in brackets ("B,L,d", "n,D[,q]")."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--shape", action="append", type=_shape_type(shape), metavar=shape,
                   help="one case (repeatable; default: the --sizes set)")
    p.add_argument("--sizes", choices=list(sizes),
                   help="a named set of shapes instead of --shape (default: 'default', each device's own; "
                        "'gpu': the GPU target shapes)")  # fmt: skip
    if dtype:
        p.add_argument("--dtype", action="append", choices=list(DTYPES),
                       help="repeatable (default: float32 on CPU, bfloat16 and float32 on GPU)")
    p.add_argument("--impl", action="append", choices=list(impls),
                   help="only these implementations (repeatable; a backend's name also picks its variants "
                        "'<name> <variant>'; default: every one runnable on the device)")  # fmt: skip
    p.add_argument("--min-time", type=float, default=1.0,
                   help="seconds of timed calls per measurement (and at least a few calls)")
    p.add_argument("--no-csv", action="store_true", help="print only; do not append to benchmarks/results")
    return p


def _shape_type(spec: str) -> Callable[[str], tuple[int, ...]]:
    required = spec.split("[")[0].count(",") + 1
    most = spec.count(",") + 1

    def parse(text: str) -> tuple[int, ...]:
        try:
            numbers = tuple(int(x) for x in text.split(","))
        except ValueError:
            numbers = ()
        if not required <= len(numbers) <= most:
            raise argparse.ArgumentTypeError(f"{text!r} is not {spec} (whole numbers)")
        return numbers

    return parse


def pick_device(args: argparse.Namespace) -> str:
    if args.device != "auto":
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def choose(impls: dict[str, Callable], wanted: list[str] | None, device: str,
           p: argparse.ArgumentParser) -> dict[str, Callable]:
    """The implementations that ``--impl`` names (all of them without ``--impl``)."""
    if not wanted:
        return impls
    chosen = {n: f for n, f in impls.items() if any(n == w or n.startswith(w + " ") for w in wanted)}
    if not chosen:
        p.error(f"none of --impl {', '.join(wanted)} runs on {device} (here: {', '.join(impls)})")
    return chosen


def timed_backends(device: str, reason: Callable[[str, str], str]) -> list[str]:
    """The op's kernel backends that run on ``device`` (``reason(backend, device)`` empty), Triton on a GPU
    only: its interpreter is a correctness tool, not a timing target."""
    return [b for b in ("cpu", "cuda", "triton") if not (device == "cpu" and b == "triton") and not reason(b, device)]


def shapes(args: argparse.Namespace, sizes: Sizes, device: str, p: argparse.ArgumentParser) -> list[tuple[int, ...]]:
    """Every ``--shape``, else the ``--sizes`` set (``default`` unless named) for the device."""
    if args.shape and args.sizes:
        p.error("--shape and --sizes are exclusive")
    if args.shape:
        return args.shape
    chosen = sizes[args.sizes or "default"]
    return list(chosen[device] if isinstance(chosen, dict) else chosen)


def dtypes(args: argparse.Namespace, device: str) -> list[str]:
    return args.dtype or DEFAULT_DTYPES[device]


@dataclass
class Case:
    """One setting every implementation is timed at."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    columns: dict[str, object]  # the settings as results-file columns, in the file's order
    title: str  # the table's heading
    csv: str | None = None  # the results file, where not the benchmark's own


@dataclass
class Row:
    """One timed pass of one implementation on one case."""

    impl: str
    pass_: str  # "fwd", "bwd", "fwd+bwd", ...; "" where a benchmark times a single call
    ms: float
    cells: dict[str, str] = field(default_factory=dict)  # the benchmark's own table columns
    fields: dict[str, object] = field(default_factory=dict)  # the benchmark's own results-file columns
    ratio: float | None = None  # the baseline's time over this one, same pass; None without the baseline


class Benchmark:
    """What is the op's own in a benchmark; ``run()`` is the shared rest.

    A subclass sets ``name`` and ``title`` (and the other class attributes where it differs) and defines
    ``setup`` and ``passes``, and ``columns`` for columns of its own.
    """

    name: str  # benchmarks/results/<name>.csv
    title: str  # what is compared: the report's first line
    impl_column = "impl"  # the column that names the implementation
    ratio_column: str | None = None  # the results-file column of the ratio (None: in the table only)
    timing: dict[str, Any] = {}  # median_ms's options other than the device and --min-time

    def __init__(self, device: str, impls: dict[str, Callable], baseline: str, note: str = "") -> None:
        self.device, self.impls, self.baseline, self.note = device, impls, baseline, note

    def setup(self, case: Case) -> Any:
        """The case's inputs, made once and shared by every implementation."""
        raise NotImplementedError

    def passes(self, inputs: Any, name: str, fn: Callable) -> dict[str, Callable[[], object]]:
        """What is timed of implementation ``fn`` on the inputs: pass name -> call ("" for a single one)."""
        raise NotImplementedError

    def columns(self, case: Case, inputs: Any, rows: list[Row]) -> None:
        """Fill the rows' own cells and fields, once every implementation of the case is timed."""

    def run(self, cases: Sequence[Case], args: argparse.Namespace) -> int:
        """Time every implementation on every case, print the tables, append the results files."""
        machine, commit, when = machine_name(self.device), git_commit(), stamp()
        print(f"# {self.title} on {machine} ({self.device}), commit {commit}, {when}")
        print(f"# {self.note + '; ' if self.note else ''}implementations: {', '.join(self.impls)}; "
              f"ratios against {self.baseline}\n")  # fmt: skip
        results: dict[str, list[dict]] = {}
        for case in cases:
            rows = self.time_case(case, args.min_time)
            print(f"## {case.title}")
            print(self.table(rows))
            print()
            results.setdefault(case.csv or self.name, []).extend(self.csv_row(case, r, when, commit, machine)
                                                                 for r in rows)  # fmt: skip
        if not args.no_csv:
            for name, rows in results.items():
                print(f"appended {len(rows)} rows to {append_csv(name, rows)}")
        return 0

    def time_case(self, case: Case, min_time_s: float) -> list[Row]:
        inputs = self.setup(case)
        rows: list[Row] = []
        for name, fn in self.impls.items():
            calls = self.passes(inputs, name, fn)
            rows += [Row(name, pass_, median_ms(call, self.device, min_time_s=min_time_s, **self.timing))
                     for pass_, call in calls.items()]  # fmt: skip
            del calls  # what the calls hold (a forward's graph) goes before the next implementation runs
        self.columns(case, inputs, rows)
        base = {r.pass_: r.ms for r in rows if r.impl == self.baseline}
        for r in rows:
            r.ratio = base[r.pass_] / r.ms if r.pass_ in base else None
        return rows

    def table(self, rows: list[Row]) -> str:
        with_pass = any(r.pass_ for r in rows)
        headers = [self.impl_column, *(["pass"] * with_pass), "median ms", *rows[0].cells,
                   f"speed-up vs {self.baseline}"]  # fmt: skip
        return markdown_table(headers, [
            [r.impl, *([r.pass_] * with_pass), f"{r.ms:.3f}", *r.cells.values(),
             "-" if r.ratio is None else f"{r.ratio:.2f}x"]
            for r in rows
        ])  # fmt: skip

    def csv_row(self, case: Case, r: Row, when: str, commit: str, machine: str) -> dict:
        row = dict(date=when, commit=commit, machine=machine, device=self.device, **case.columns)
        row[self.impl_column] = r.impl
        if r.pass_:
            row["pass_"] = r.pass_
        row["median_ms"] = f"{r.ms:.4f}"
        row.update(r.fields)
        if self.ratio_column:
            row[self.ratio_column] = "" if r.ratio is None else f"{r.ratio:.3f}"
        return row
