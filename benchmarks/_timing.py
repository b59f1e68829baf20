"""Timing and bookkeeping shared by the benchmark scripts (docs/design.md section 9).

Implementations are always compared side by side in one process, on the same
inputs, as medians. On GPU the timer is ``triton.testing.do_bench``; on CPU a
median over repeated runs with the garbage collector off and warm-up first.
The op benchmarks' common structure (options, case loop, table, CSV) is in ``_harness.py``.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], object], device: str, *, min_time_s: float = 1.0, min_reps: int = 5, warmup: int = 2,
              wall_clock: bool = False) -> float:
    """Median time of ``fn()`` in milliseconds.

    On a GPU ``triton.testing.do_bench`` times it, unless ``wall_clock``: calls that take a second or more are
    then timed one by one between synchronisations, as on a CPU (do_bench would make hundreds of them).
    Otherwise ``warmup`` untimed calls (first-call allocations, lazy init, compilation), then at least
    ``min_reps`` timed calls and ``min_time_s`` seconds of them (1000 calls at most), garbage collector off.
    """
    if device == "cuda" and not wall_clock:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=max(100, int(min_time_s * 1000)), return_mode="median"))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_time_s:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
            if len(times) >= 1000:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times) * 1e3


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU model with its core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_csv(name: str, rows: Sequence[dict]) -> Path:
    """Append rows to ``benchmarks/results/<name>.csv`` (header written once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    new = not path.exists()
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(rows[0]):
            raise ValueError(f"{path}: its columns {header} differ from this benchmark's {list(rows[0])}; "
                             "move the old file aside")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy rate (bytes read plus written per second), the memory ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, min_time_s=0.5)
    return 2 * nbytes / (ms * 1e-3) / 1e9
