"""Machine-code report of grasp's GPU kernels for sm_80 / sm_90, made without a GPU.

Compiles every Triton kernel of ``grasp_kernels`` at the target shapes of ``benchmarks/gpu_model.py``,
for every config its autotuner's pruner keeps there (each can be chosen at run time), through Triton's
own compiler and ptxas; and every ``.cu`` under ``csrc/cuda`` with ``nvcc -Xptxas -v``. Prints one table:
kernel, arch, shape, dtype, config, registers, spill bytes (stores/loads), shared memory, and the
instruction features that matter on the GPU:

- ``mma``: tensor-core instructions and their input type (``mma.bf16``, ``wgmma.tf32``; ``-`` for none);
- ``ld16``: 16-byte global loads (``ld``: ``ld.global`` of a 16-byte vector, i.e. ``LDG.E.128``;
  ``cp.async``: 16-byte asynchronous copies; ``tma``: tensor-memory copies);
- ``atomics``: the count of ``atom`` / ``red`` instructions and their memory ordering; ``FENCED`` when an
  atomic has acquire/release semantics or a memory fence (``membar``, ``fence.sc`` / ``fence.acq_rel``)
  sits in the same kernel (relaxed atomics without fences are fine).

Shared memory is Triton's dynamic allocation for Triton kernels and the static ``__shared__`` size for
CUDA C++ kernels. A second table gives the byte and FLOP model of each kernel at the target shapes.

``--check`` (CI) exits non-zero, with a one-line reason each, on: a spill in any config that can be chosen
or in any CUDA C++ kernel; a fenced atomic in a backward Triton kernel (as the case tables mark them) or
in any CUDA C++ kernel (whose roles no table records; none needs ordered atomics); no ``mma`` / ``wgmma``
in the default kNN search on sm_80 and sm_90; a compile error; a Triton kernel without a case table, or a
case table that no longer fits its kernel (``benchmarks/_gpu_cases.py``).

Compiles run in parallel worker processes; results are cached under ``build/gpu_code_report/`` keyed by
the kernel module's source (the ``.cu`` sources and the nvcc flags for CUDA), the Triton version,
signature, constants, config and architecture, so a second run with unchanged sources is near-instant.

    python benchmarks/gpu_code_report.py                     # both archs, the full table
    python benchmarks/gpu_code_report.py --check             # CI: the table and the gates
    python benchmarks/gpu_code_report.py --only knn --arch 90 --no-cuda --csv build/knn.csv
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(HERE), str(ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import _machine_code  # noqa: E402
import gpu_model  # noqa: E402

CACHE_DIR = ROOT / "build" / "gpu_code_report"
CUDA_DIR = ROOT / "csrc" / "cuda"
#: Bumped when the result format of a cache entry changes.
_CACHE_FORMAT = 1
_BACKWARD_CUDA = ("backward", "bwd", "grad")
_COLUMNS = ("kernel", "arch", "shape", "dtype", "config", "regs", "spill", "smem", "mma", "ld16", "atomics")


@dataclass
class Row:
    """One compiled kernel configuration (or its compile error)."""

    kernel: str
    arch: int
    shape: str
    dtype: str
    config: str
    backward: bool
    resources: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    error: str = ""

    @property
    def spilled(self) -> int:
        return self.resources.get("spill_stores", 0) + self.resources.get("spill_loads", 0)

    def feature(self) -> _machine_code.Features:
        return _machine_code.Features(**self.features)

    def cells(self) -> dict[str, str]:
        """The table's cells of this row."""
        base = dict(kernel=self.kernel, arch=f"sm_{self.arch}", shape=self.shape, dtype=self.dtype, config=self.config)
        if self.error:
            return dict(base, regs="ERROR", spill=self.error[:80], smem="", mma="", ld16="", atomics="")
        f, r = self.feature(), self.resources
        atomics = "-"
        if f.atomics:
            atomics = f"{f.atomics} {'/'.join(f.atomic_sems)}" + (f" +{f.fences} fences" if f.fences else "")
            atomics += " FENCED" if f.fenced_atomics else ""
        spill = f"{r['spill_stores']}/{r['spill_loads']}" + (f" st{r['stack']}" if r["stack"] else "")
        return dict(base, regs=str(r["registers"]), spill=spill,
                    smem=str(r["shared"]), mma=",".join(f.mma) or "-", ld16=",".join(f.load16) or "-",
                    atomics=atomics)


# ------------------------------------------------------------------------------------------ jobs


def _cuda_jobs(archs: list[int]) -> list:
    """One job per .cu file and architecture (all kernels of a file compile together)."""
    from _gpu_cases import Job

    nvcc = _machine_code.find_tool("nvcc")
    if nvcc is None:
        raise SystemExit("error: nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin "
                         "(install the CUDA toolkit, or pass --no-cuda)")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    if not sources:
        raise SystemExit(f"error: no .cu files under {CUDA_DIR}")
    digest = _cuda_digest()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for arch in archs:
        flags = _machine_code.nvcc_flags(arch)
        for path in sources:
            payload = dict(path=str(path), arch=arch, nvcc=nvcc, flags=flags)
            key = dict(kind="cuda", file=path.name, source=digest, nvcc=version, flags=flags, arch=arch)
            jobs.append(Job("cuda", path.stem, arch, payload=payload, key=key))
    return jobs


def _cuda_digest() -> str:
    """sha256 of every file a .cu may include from the repository: csrc/cuda and csrc's headers."""
    digest = hashlib.sha256()
    for path in sorted([*CUDA_DIR.rglob("*"), *ROOT.joinpath("csrc").glob("*.h")]):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _unchanged(job) -> bool:
    """Whether the sources a job compiled are still those its cache key names (not edited meanwhile)."""
    from _gpu_cases import source_digest

    now = _cuda_digest() if job.kind == "cuda" else source_digest(job.payload["module"])
    return now == job.key["source"]


def _cache_path(cache_dir: Path, job) -> Path:
    text = json.dumps(dict(job.key, format=_CACHE_FORMAT), sort_keys=True, default=str)
    return cache_dir / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.json"


def _run(jobs: list, workers: int, cache_dir: Path, use_cache: bool) -> tuple[list[tuple], int, int, float]:
    """(job, results) for every job; the number of compiles run, the number of jobs read from the cache, and
    the CPU seconds of the compiles. Jobs with the same key (another case with identical arguments) share
    one compile. ``use_cache`` False: no cache is read or written."""
    groups: dict[Path, list] = {}
    for job in jobs:
        groups.setdefault(_cache_path(cache_dir, job), []).append(job)
    done, todo = [], []
    for path, group in groups.items():
        if use_cache and path.is_file():
            results = json.loads(path.read_text())
            done.extend((job, results) for job in group)
        else:
            todo.append(path)
    cached = len(done)
    if not todo:
        return done, 0, cached, 0.0
    if use_cache:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # nvcc files first (the longest), then the Triton kernels by their expected cost.
    todo.sort(key=lambda path: (groups[path][0].kind != "cuda", "knn" not in groups[path][0].kernel))
    context = multiprocessing.get_context("spawn")  # no fork of a process that has imported torch
    started, finished, cpu = time.perf_counter(), 0, 0.0
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                initializer=_machine_code.worker_init) as pool:
        futures = {}
        for path in todo:
            job = groups[path][0]
            work = _machine_code.compile_cuda if job.kind == "cuda" else _machine_code.compile_triton
            futures[pool.submit(work, job.payload)] = path
        for future in concurrent.futures.as_completed(futures):
            path = futures[future]
            results = future.result()
            cpu += sum(r.get("cpu_seconds", 0.0) for r in results)
            if use_cache and not any("error" in r for r in results) and _unchanged(groups[path][0]):
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(results))
                os.replace(tmp, path)
            done.extend((job, results) for job in groups[path])
            finished += 1
            if finished % 100 == 0 or finished == len(todo):
                print(f"  compiled {finished}/{len(todo)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return done, len(todo), cached, cpu


def _rows(results: list[tuple], only: str | None) -> list[Row]:
    rows = []
    for job, outputs in results:
        for out in outputs:
            if job.kind == "cuda":
                name = f"cuda.{out.get('name', job.kernel).removesuffix('_kernel')}"
                if only and only not in name and "error" not in out:
                    continue
                backward = any(word in name for word in _BACKWARD_CUDA)
                row = Row(name, job.arch, job.kernel, "", out.get("template", ""), backward)
            else:
                row = Row(job.kernel, job.arch, job.shape, job.dtype, job.config, job.backward)
            row.resources, row.features = out.get("resources", {}), out.get("features", {})
            row.error = out.get("error", "")
            rows.append((job.kind == "cuda", job.order, row.kernel, row.config, row.arch, row))
    # Triton rows in case-table order (each config's archs together), then the CUDA kernels by name.
    return [item[-1] for item in sorted(rows, key=lambda item: item[:-1])]


# ------------------------------------------------------------------------------------------ gates


def gates(rows: list[Row], default_search: dict, default_precision: str | None, archs: list[int]) -> list[str]:
    """One line per failed gate (see the module notes). ``default_search`` names the default kNN search
    (display kernel name, dtype, the precision it assumes); ``default_precision`` is the op's default."""
    failures = []
    for r in rows:
        where = f"{r.kernel} sm_{r.arch} {r.shape} {r.dtype} [{r.config}]".replace("  ", " ")
        if r.error:
            failures.append(f"compile error: {where}: {r.error}")
            continue
        if r.spilled:
            failures.append(f"spill: {where}: {r.resources['spill_stores']} B stored, "
                            f"{r.resources['spill_loads']} B loaded")
        if (r.backward or r.kernel.startswith("cuda.")) and r.feature().fenced_atomics:
            f = r.feature()
            role = "a backward" if r.backward else "a CUDA C++"
            failures.append(f"fenced atomic in {role} kernel: {where}: {f.atomics} atomics "
                            f"({'/'.join(f.atomic_sems)}), {f.fences} fences")
    if default_precision is not None and default_precision != default_search["precision"]:
        failures.append(f"default kNN search: grasp.ops.topk_neighbor_mean's default precision is "
                        f"{default_precision!r}, but "
                        f"DEFAULT_KNN_SEARCH in benchmarks/_gpu_cases.py assumes {default_search['precision']!r}")
    for arch in (a for a in (80, 90) if a in archs):
        search = [r for r in rows if r.kernel == default_search["kernel"] and r.dtype == default_search["dtype"]
                  and r.arch == arch and not r.error]
        for r in search:
            if not r.feature().mma:
                failures.append(f"no mma/wgmma in the default kNN search: {r.kernel} sm_{arch} {r.shape} {r.dtype} "
                                f"[{r.config}]")
    return failures


def _default_search() -> tuple[dict, str | None]:
    """The default kNN search of the case tables (display name) and grasp.ops.topk_neighbor_mean's default precision."""
    import inspect

    from _gpu_cases import DEFAULT_KNN_SEARCH, _display_name

    from grasp.ops.topk_neighbor_mean import topk_neighbor_mean

    spec = dict(DEFAULT_KNN_SEARCH, kernel=_display_name(DEFAULT_KNN_SEARCH["module"], DEFAULT_KNN_SEARCH["kernel"]))
    return spec, inspect.signature(topk_neighbor_mean).parameters["precision"].default


# ------------------------------------------------------------------------------------------ output


def format_table(records: list[dict[str, str]], columns: tuple[str, ...]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in records)) if records else len(c) for c in columns}
    lines = [{c: c for c in columns}, {c: "-" * widths[c] for c in columns}, *records]
    return "\n".join("  ".join(line[c].ljust(widths[c]) for c in columns).rstrip() for line in lines)


def model_table() -> str:
    records = []
    for work in gpu_model.target_work():
        records.append(dict(kernel=work.name, shape=work.shape, MB=f"{work.bytes / 1e6:.1f}",
                            GFLOP=f"{work.flops / 1e9:.2f}", **{"FLOP/B": f"{work.intensity:.2f}"}))
    return format_table(records, ("kernel", "shape", "MB", "GFLOP", "FLOP/B"))


def _write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*_COLUMNS, "spill_stores", "spill_loads", "backward", "error"])
        for r in rows:
            cells = r.cells()
            writer.writerow([*(cells[c] for c in _COLUMNS), r.resources.get("spill_stores", ""),
                             r.resources.get("spill_loads", ""), int(r.backward), r.error])


# ------------------------------------------------------------------------------------------ main


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80 90)")
    parser.add_argument("--only", help="only kernels whose name contains this (e.g. knn, hae.hae_bwd, cuda.)")
    parser.add_argument("--no-cuda", action="store_true", help="skip the .cu files")
    parser.add_argument("--check", action="store_true", help="exit non-zero when a gate fails (CI)")
    parser.add_argument("--csv", type=Path, help="also write the table as CSV")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help=f"result cache (default {CACHE_DIR})")
    parser.add_argument("--no-cache", action="store_true", help="compile everything again, write no cache")
    parser.add_argument("--list", action="store_true",
                        help="only list the Triton compile jobs per kernel and check the case tables")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if any(a < 80 for a in args.arch):
        parser.error("--arch: the kernels target sm_80 and newer (80, 86, 89, 90)")
    return args


def _list(jobs: list, problems: list[str], check: bool) -> int:
    """Print the Triton compile jobs per kernel and arch, and the case-table problems."""
    counts: dict[tuple[str, int], int] = {}
    for job in jobs:
        counts[(job.kernel, job.arch)] = counts.get((job.kernel, job.arch), 0) + 1
    records = [dict(kernel=k, arch=f"sm_{a}", configs=str(n)) for (k, a), n in counts.items()]
    print(format_table(records, ("kernel", "arch", "configs")))
    print(f"{len(jobs)} Triton compile jobs")
    for line in problems:
        print(f"{'FAIL' if check else 'problem:'} {line}")
    return 1 if check and problems else 0


def main(argv: list[str] | None = None) -> int:
    """Print the report; the exit status is 1 when a compile failed or (with --check) a gate failed."""
    if os.environ.get("TRITON_INTERPRET"):
        # The interpreter replaces the kernels' JIT functions: run again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        print("gpu_code_report: TRITON_INTERPRET is set; running again without it", file=sys.stderr)
        args = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env).returncode
    args = _parse(argv)
    started = time.perf_counter()
    import _gpu_cases

    jobs, problems = _gpu_cases.compile_jobs(args.arch, args.only)
    problems += [f"no case table for the Triton kernel {name}; add one to benchmarks/_gpu_cases.py"
                 for name in _gpu_cases.uncovered_kernels()]
    if args.list:
        return _list(jobs, problems, args.check)
    if not args.no_cuda:
        jobs += _cuda_jobs(args.arch)
    results, compiled, cached, cpu = _run(jobs, args.jobs, args.cache_dir, not args.no_cache)
    rows = _rows(results, args.only)

    print(format_table([r.cells() for r in rows], _COLUMNS))
    print()
    print("Byte and FLOP model at the target shapes (benchmarks/gpu_model.py: each input read once, each output "
          "written once)")
    print(model_table())
    print()
    triton_jobs = sum(j.kind == "triton" for j in jobs)
    shared = len(jobs) - compiled - cached
    print(f"{len(rows)} rows from {len(jobs)} compile jobs ({triton_jobs} Triton configs, {len(jobs) - triton_jobs} "
          f"nvcc files): {compiled} compiled, {cached} cached, {shared} identical to another job; "
          f"{time.perf_counter() - started:.1f} s with {args.jobs} workers ({cpu:.0f} s of compile CPU time)")
    if args.csv:
        _write_csv(args.csv, rows)

    default_search, default_precision = _default_search()
    failures = problems + gates(rows, default_search, default_precision, args.arch)
    errors = [r for r in rows if r.error]
    if not args.check:
        for line in problems:
            print(f"problem: {line}")
    else:
        searched = any(r.kernel == default_search["kernel"] for r in rows)
        if not searched:
            print(f"note: {default_search['kernel']} not compiled (--only / --arch): its mma gate was not evaluated")
        for line in failures:
            print(f"FAIL {line}")
        print("gates: " + (f"{len(failures)} failed" if failures else "all passed"))
        return 1 if failures else 0
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
