"""The GPU suite: build, test and benchmark grasp on a lent H100 / H200 in one call of at most 8 minutes.

Run it through ``benchmarks/gpu_suite.sh`` from the repository root of a copy of the working tree on a bare
GPU machine (torch with CUDA, triton and nvcc installed; no network needed):

    bash benchmarks/gpu_suite.sh             # the real run, on the GPU machine
    bash benchmarks/gpu_suite.sh --dry-run   # any machine: every step up to the first GPU call

Steps, each a subprocess with its own time budget (a step that fails or runs out of time is recorded and
the suite goes on; the exit status is non-zero if any step failed):

1. versions: Python, torch and its CUDA, triton, cupy, faiss, nvcc, nvidia-smi;
2. build: the CUDA extension for the GPU's own architecture only (sm_90 on H100/H200), compiled in parallel;
3. ceilings: device-to-device copy bandwidth and the bf16 / tf32 / fp32 matmul rates, measured here;
4. tests: the CUDA cases of the three ops' tests (every backend and dtype, opcheck, torch.compile); then
   ``cuda_jit_check.py``: the NVRTC path of the cuda backend against the compiled one (bitwise, every dtype)
   and its first-use compile and cached load times;
5. benchmarks at the GPU sizes: holistic_attention (B=2048, L=200, d=64), the projected op on a training
   batch, topk_neighbor_mean (n = 1M, D = 1536, k = 10, 65,536 queries, each precision, against faiss-gpu
   when present), and training
   sequences/s of SASRec and SASRec+GRASP;
6. results: ``benchmarks/results/<gpu>-<date>.md`` and ``.csv`` with every measurement as a fraction of the
   measured ceilings (the byte and FLOP model of each kernel is in ``benchmarks/gpu_model.py``), copied to
   ``$OUT`` too when that is set.

``--dry-run`` runs step 1, checks what the later steps need (the build's prerequisites, that every benchmark
and test imports and parses its arguments, that the results writer works on a sample), prints the commands it
would run, and stops before the first GPU call. CI runs it.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
PY = sys.executable
#: Wall-time budget of the whole suite on the GPU machine (seconds); the steps' budgets add up to less.
TOTAL_BUDGET_S = 480

OP_TESTS = ["tests/test_holistic_attention.py", "tests/test_holistic_attention_projected.py",
            "tests/test_topk_neighbor_mean.py"]  # fmt: skip


@dataclass
class Step:
    """One subprocess of the suite: its command, time budget, and what the run recorded."""

    name: str
    command: list[str]
    budget_s: int
    env: dict[str, str] = field(default_factory=dict)
    status: str = "not run"
    seconds: float = 0.0
    output: str = ""


def gpu_steps(arch: str, jobs: int) -> list[Step]:
    """The steps after the versions, in order, with budgets that fit TOTAL_BUDGET_S."""
    bench = [PY, "-u"]
    return [
        Step("build", [PY, "setup.py", "build_ext", "--inplace"], 120,
             {"GRASP_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs)}),
        Step("ceilings", [*bench, str(BENCH / "gpu_suite.py"), "--ceilings"], 20),
        Step("tests", [PY, "-m", "pytest", "-q", "--maxfail=20", "-k", "cuda", "-p", "no:cacheprovider",
                       *(["-n", "8"] if _has_module("xdist") else []), *OP_TESTS], 90),
        Step("nvrtc", [*bench, str(BENCH / "cuda_jit_check.py")], 90),
        Step("holistic_attention", [*bench, str(BENCH / "benchmark_holistic_attention.py"), "--device", "cuda",
                                    "--shape", "2048,200,64", "--dtype", "bfloat16", "--dtype", "float32",
                                    "--min-time", "0.3"], 25),
        Step("holistic_attention_projected",
             [*bench, str(BENCH / "benchmark_holistic_attention_projected.py"), "--device", "cuda",
              "--shape", "2048,20000,409600,64,64", "--dtype", "bfloat16", "--dtype", "float32",
              "--min-time", "0.3"], 25),
        Step("topk_neighbor_mean", [*bench, str(BENCH / "benchmark_topk_neighbor_mean.py"), "--device", "cuda",
                                    "--shape", "1000000,1536,65536", "--k", "10", "--min-time", "0.3",
                                    "--skip-reference"], 60),
        Step("train", [*bench, str(BENCH / "benchmark_train.py"), "--device", "cuda",
                       "--synthetic", "20000", "5000", "--models", "sasrec:id", "sasrec:grasp",
                       "--batch-size", "256", "--epochs", "3"], 50),
    ]  # fmt: skip


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_step(step: Step, log: io.TextIOBase) -> None:
    """Run ``step`` with its budget, echoing its output to the terminal and the log."""
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    banner = f"\n=== {step.name} (budget {step.budget_s} s): {' '.join(step.command)}"
    print(banner, flush=True)
    log.write(banner + "\n")
    start = time.perf_counter()
    proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    chunks: list[str] = []
    try:
        out, _ = proc.communicate(timeout=step.budget_s)
        chunks.append(out)
        step.status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        chunks.append(out)
        step.status = f"timed out after {step.budget_s} s"
    step.seconds = time.perf_counter() - start
    step.output = "".join(chunks)
    print(step.output, end="", flush=True)
    log.write(step.output)
    print(f"--- {step.name}: {step.status} in {step.seconds:.0f} s", flush=True)
    log.write(f"--- {step.name}: {step.status} in {step.seconds:.0f} s\n")


def versions() -> dict[str, str]:
    """Versions of everything the suite uses ("absent" where a package or tool is missing)."""
    found: dict[str, str] = {"python": sys.version.split()[0]}
    try:
        import torch

        found["torch"] = torch.__version__
        found["torch CUDA"] = str(torch.version.cuda)
    except ImportError:
        found["torch"] = "absent"
    for module in ("triton", "cupy", "faiss", "numpy"):
        try:
            found[module] = getattr(__import__(module), "__version__", "present")
        except Exception as exc:  # a broken optional install is reported, not fatal
            found[module] = f"absent ({type(exc).__name__})"
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    found["nvcc"] = _first_line([nvcc, "--version"], last=True) if nvcc else "absent"
    smi = shutil.which("nvidia-smi")
    found["nvidia-smi"] = (_first_line([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                        "--format=csv,noheader"]) if smi else "absent")  # fmt: skip
    return found


def _first_line(command: list[str], last: bool = False) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"failed ({type(exc).__name__})"
    return (out[-1] if last else out[0]) if out else "no output"


def measure_ceilings() -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and matmul rates (TFLOP/s) of this GPU, as medians."""
    import torch
    from triton.testing import do_bench

    nbytes = 1 << 30
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    ceilings = {"copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9}
    n = 8192
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):  # fmt: skip
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, dtype=dtype, device="cuda")
        b = torch.randn(n, n, dtype=dtype, device="cuda")
        ms = do_bench(lambda a=a, b=b: a @ b, warmup=25, rep=200, return_mode="median")
        ceilings[f"matmul_{name}_tflops"] = 2 * n**3 / (ms * 1e-3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return ceilings


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


BENCH_CSVS = {"holistic_attention": "holistic_attention.csv",
              "holistic_attention_projected": "holistic_attention_projected.csv",
              "topk_neighbor_mean": "topk_neighbor_mean.csv",
              "topk_neighbor_mean_queries": "topk_neighbor_mean_queries.csv", "train": "train.csv"}  # fmt: skip


def fractions(row: dict[str, str], ceilings: dict[str, float]) -> dict[str, str]:
    """A benchmark row's achieved rates as fractions of the measured ceilings, where the row gives a rate."""
    extra: dict[str, str] = {}
    if row.get("gbps") and ceilings.get("copy_gbps"):
        extra["fraction_of_copy"] = f"{float(row['gbps']) / ceilings['copy_gbps']:.3f}"
    if row.get("tflops") and ceilings.get("matmul_bf16_tflops"):
        extra["fraction_of_bf16_matmul"] = f"{float(row['tflops']) / ceilings['matmul_bf16_tflops']:.3f}"
    return extra


def write_results(gpu: str, info: dict[str, str], ceilings: dict[str, float], steps: list[Step],
                  new_rows: dict[str, list[dict[str, str]]], directory: Path) -> tuple[Path, Path]:
    """Write ``<gpu>-<date>.md`` and ``.csv`` into ``directory``; return their paths."""
    date = datetime.date.today().isoformat()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "gpu"
    md_path, csv_path = directory / f"{slug}-{date}.md", directory / f"{slug}-{date}.csv"
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    lines = [f"# GPU suite: {gpu}, {date}, commit {commit}", "",
             f"Command: `bash benchmarks/gpu_suite.sh` (one call on a bare machine; budget {TOTAL_BUDGET_S} s).", "",
             "## Versions", "", "| what | version |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += ["", "## Measured ceilings", "", "| ceiling | value |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in ceilings.items()]
    lines += ["", "## Steps", "", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.0f} |" for s in steps]
    rows_out: list[dict[str, str]] = []
    for name, rows in new_rows.items():
        if not rows:
            continue
        rows = [{"benchmark": name, **r, **fractions(r, ceilings)} for r in rows]
        rows_out += rows
        keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("date", "commit", "machine")))
        lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(r.get(k, "") for k in keys) + " |" for r in rows]
    tests = next((s for s in steps if s.name == "tests"), None)
    if tests is not None and tests.output:
        summary = [ln for ln in tests.output.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        lines += ["", "## Tests", "", "```", *(summary[-1:] or ["(no summary line)"]), "```"]
    md_path.write_text("\n".join(lines) + "\n")
    rows_out = [{"benchmark": "ceiling", "metric": k, "value": f"{v:.3f}"} for k, v in ceilings.items()] + rows_out
    keys = list(dict.fromkeys(k for r in rows_out for k in r if k != "date"))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["gpu", "suite_date", *keys], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({"gpu": gpu, "suite_date": date, **r} for r in rows_out)
    return md_path, csv_path


# Runs a benchmark script up to its argument parsing: parse_args parses for real (an unknown or bad argument
# fails as it would on the GPU machine), then exits before the script touches a device.
_PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_then_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_then_stop
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def dry_run(steps: list[Step]) -> int:
    """Check every step up to the first GPU call; return the number of problems found."""
    problems = 0

    def check(what: str, ok: bool, detail: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {what}{': ' + detail if detail else ''}", flush=True)

    check("setup.py and csrc/sources.txt", (ROOT / "setup.py").exists() and (ROOT / "csrc" / "sources.txt").exists())
    nvcc = shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()
    print(f"[info] nvcc {'found' if nvcc else 'not found (the build step needs it on the GPU machine)'}")
    for step in steps:
        script = next((Path(c) for c in step.command if c.endswith(".py") and Path(c).is_absolute()), None)
        if step.name == "build":
            continue
        if step.name == "tests":
            result = subprocess.run([PY, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *OP_TESTS],
                                    cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
            check("the op tests collect", result.returncode == 0, result.stdout.strip().splitlines()[-1]
                  if result.stdout.strip() else result.stderr[-500:])  # fmt: skip
            continue
        if script is not None and script.name != "gpu_suite.py":
            args = step.command[step.command.index(str(script)) + 1 :]
            result = subprocess.run([PY, "-c", _PARSE_ONLY, str(script), *args], cwd=ROOT, capture_output=True,
                                    text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
            check(f"{script.name} imports and takes {' '.join(args)}", result.returncode == 0, result.stderr[-500:])
    with_sample = _sample_results()
    check("the results writer", with_sample is not None, "" if with_sample is None else str(with_sample))
    for step in steps:
        env = " ".join(f"{k}={v}" for k, v in step.env.items())
        print(f"[plan] {step.name} ({step.budget_s} s): {env + ' ' if env else ''}{' '.join(step.command)}")
    print(f"[plan] budgets add up to {sum(s.budget_s for s in steps)} s of {TOTAL_BUDGET_S} s")
    check("the budgets fit the suite's", sum(s.budget_s for s in steps) <= TOTAL_BUDGET_S)
    return problems


def _sample_results() -> Path | None:
    """Write results for made-up measurements into a temporary folder (the dry run's check of the writer)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sample = {"holistic_attention": [{"date": "d", "impl": "triton", "median_ms": "1.0", "gbps": "1000"}]}
        md, csv_file = write_results("Sample GPU", {"python": sys.version.split()[0]}, {"copy_gbps": 4000.0},
                                     [Step("build", [], 1, status="ok")], sample, Path(tmp))  # fmt: skip
        ok = "fraction_of_copy" in csv_file.read_text() and "0.250" in md.read_text()
        return md.name if ok else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check every step up to the first GPU call")
    parser.add_argument("--ceilings", action="store_true", help="only measure and print the ceilings (a step)")
    args = parser.parse_args(argv)
    if args.ceilings:
        print(json.dumps(measure_ceilings()))
        return 0

    info = versions()
    for k, v in info.items():
        print(f"{k:>12}: {v}")
    if args.dry_run:
        problems = dry_run(gpu_steps("9.0", os.cpu_count() or 1))
        print(f"dry run: {'all checks passed' if not problems else f'{problems} problem(s)'}; stopped before the "
              "first GPU call")  # fmt: skip
        return 1 if problems else 0

    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch: run with --dry-run on a machine without one", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    steps = gpu_steps(f"{major}.{minor}", os.cpu_count() or 1)
    before = {name: len(_csv_rows(RESULTS / file)) for name, file in BENCH_CSVS.items()}
    log_dir = Path(os.environ.get("OUT") or ROOT / "build")
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ceilings: dict[str, float] = {}
    with (log_dir / "gpu_suite.log").open("w") as log:
        for step in steps:
            run_step(step, log)
            if step.name == "ceilings" and step.status == "ok":
                ceilings = json.loads(step.output.strip().splitlines()[-1])
    new_rows = {name: _csv_rows(RESULTS / file)[before[name]:] for name, file in BENCH_CSVS.items()}
    md, csv_file = write_results(gpu, info, ceilings, steps, new_rows, RESULTS)
    if os.environ.get("OUT"):
        for path in (md, csv_file):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    failed = [s.name for s in steps if s.status != "ok"]
    print(f"\nwrote {md} and {csv_file}; {time.perf_counter() - started:.0f} s in all; "
          f"{'failed: ' + ', '.join(failed) if failed else 'every step passed'}")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
