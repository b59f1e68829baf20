"""Benchmark of grasp.ops.topk_neighbor_mean against reference PyTorch and faiss, side by side.

Every method computes the same thing on the same data: for each query (the first q of the n rows, all
of them by default), the mean of its k most cosine-similar other rows. faiss is timed with its exact
search (`faiss.knn` on CPU, `faiss.knn_gpu` on GPU) plus the gather-mean (numpy on CPU, torch on GPU)
and the row normalisation, as a user would run it. On a GPU every grasp backend runs at each precision
("fast": tensor-core candidates + float32 proof, the default; "highest": plain float32 search). The
table shows the median time, the achieved TFLOP/s of the similarity products (2·q·n·D), the fraction
of the matmul rate measured in the same run, recall@k against the float32 exact result (the reference
backend, or the first exact method when the reference is skipped), how many queries got a different
neighbour set, and the largest difference of the means from that result.

    python benchmarks/benchmark_topk_neighbor_mean.py                  # device defaults
    python benchmarks/benchmark_topk_neighbor_mean.py --n 100000 --dim 384 --k 10
    python benchmarks/benchmark_topk_neighbor_mean.py --sizes gpu      # n = 1M, D = 1536 and 384, 65536 queries

Runs with a query subset (``--queries``, or the ``gpu`` size set) append to
``results/topk_neighbor_mean_queries.csv`` (with a ``q`` column); full runs to
``results/topk_neighbor_mean.csv``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import append_csv, git_commit, machine_name, markdown_table, median_ms, stamp  # noqa: E402

import grasp  # noqa: E402
from grasp.ops._topk_neighbor_mean_reference import drop_own  # noqa: E402
from grasp.ops.topk_neighbor_mean import backend_reason  # noqa: E402

#: Size sets: per device, the database rows n, the widths D and the queries (None: all n rows).
SIZES = {
    "default": {"cpu": dict(n=[50_000, 100_000], dim=[384], queries=None),
                "cuda": dict(n=[1_000_000], dim=[1536, 4096], queries=None)},
    # The GPU target shapes, with a query subset so that every method (float32 ones included) fits a
    # few minutes: the rates per query hold for all n queries.
    "gpu": {"cpu": dict(n=[1_000_000], dim=[1536, 384], queries=65_536),
            "cuda": dict(n=[1_000_000], dim=[1536, 384], queries=65_536)},
}
PRECISIONS = ("fast", "highest")


def faiss_baseline(x: torch.Tensor, k: int, q: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss exact inner-product search of the first q rows (default all) among the normalised rows of x,
    self excluded, + gather-mean (numpy on CPU)."""
    import faiss

    from grasp.ops._topk_neighbor_mean_faiss import _gpu_resources

    q = x.shape[0] if q is None else q
    own = torch.arange(q, device=x.device)
    if x.is_cuda:
        import importlib

        importlib.import_module("faiss.contrib.torch_utils")
        xn = torch.nn.functional.normalize(x.float(), dim=1)
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(x.device):
            scores, idx = faiss.knn_gpu(_gpu_resources(index), xn[:q], xn, k + 1, metric=faiss.METRIC_INNER_PRODUCT,
                                        device=index)
        _, idx = drop_own(scores, idx.long(), own, k)
        return x[idx].float().mean(1).to(x.dtype), idx
    xn = x.float().numpy().copy()
    faiss.normalize_L2(xn)
    scores, idx = faiss.knn(xn[:q], xn, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    _, idx = drop_own(torch.from_numpy(scores), torch.from_numpy(idx), own, k)
    return torch.from_numpy(x.numpy()[idx.numpy()].mean(1)), idx


def methods(device: str, skip_reference: bool) -> dict[str, Callable]:
    """Name -> fn(x, k, q=None) returning (mean, indices) of the first q rows of x (default all) as queries."""
    out: dict[str, Callable] = {}

    def grasp_method(backend: str, precision: str) -> Callable:
        def run(x, k, q=None):
            queries = None if q is None or q == x.shape[0] else x[:q]
            mean, idx, _ = grasp.ops.topk_neighbor_mean(x, k, queries=queries, exclude_self=True, backend=backend,
                                                        precision=precision, return_indices=True)
            return mean, idx

        return run

    if not skip_reference:
        out["reference"] = grasp_method("reference", "highest")
    for backend in ("cpu", "cuda", "triton"):
        if device == "cpu" and backend == "triton":
            continue  # the interpreter is a correctness tool, not a timing target
        if backend_reason(backend, device):
            continue
        if device == "cuda":  # the precisions differ on GPU tensors only
            for precision in PRECISIONS:
                out[f"{backend} {precision}"] = grasp_method(backend, precision)
        else:
            out[backend] = grasp_method(backend, "highest")
    if not backend_reason("faiss", device):
        out["faiss"] = faiss_baseline
    return out


def matmul_tflops(device: str) -> float:
    """The machine's measured matmul rate: bf16 on GPU, float32 on CPU (the dtype the kernels use)."""
    size = 8192 if device == "cuda" else 2048
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, min_time_s=1.0)
    return 2 * size**3 / (ms * 1e-3) / 1e12


def rows_differing(idx: torch.Tensor, truth: torch.Tensor) -> int:
    """Queries whose neighbour set is not exactly the truth's."""
    return int((idx.cpu().sort(1).values != truth.cpu().sort(1).values).any(1).sum())


def recall(idx: torch.Tensor, truth: torch.Tensor) -> float:
    idx, truth = idx.cpu(), truth.cpu()
    hits = torch.zeros((), dtype=torch.int64)
    for start in range(0, idx.shape[0], 8192):
        a, b = idx[start : start + 8192], truth[start : start + 8192]
        hits += (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum()
    return hits.item() / truth.numel()


def run_size(impls: dict[str, Callable], x: torch.Tensor, k: int, q: int, repeats: int,
             device: str) -> dict[str, tuple[float, tuple[torch.Tensor, torch.Tensor]]]:
    """Median milliseconds and the last result of every method on the first q rows of x as queries."""
    results = {}
    for name, fn in impls.items():
        warm = min(x.shape[0], 2048)
        fn(x[:warm], k, min(q, warm))  # warm-up: kernels, autotuning, faiss threads
        times, out = [], None
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(x, k, q)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results[name] = (sorted(times)[len(times) // 2] * 1e3, out)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--sizes", default="default", choices=list(SIZES), help="size set (--n/--dim override it)")
    parser.add_argument("--n", type=int, action="append", help="rows (repeatable)")
    parser.add_argument("--dim", type=int, action="append", help="embedding width D (repeatable)")
    parser.add_argument("--queries", type=int, help="queries: the first q rows (default: the size set's, else all)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference backend")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = SIZES[args.sizes][device]
    ns, dims = args.n or sizes["n"], args.dim or sizes["dim"]
    queries = args.queries or sizes["queries"]
    machine, commit, when = machine_name(device), git_commit(), stamp()
    rate = matmul_tflops(device)
    impls = methods(device, args.skip_reference)
    print(f"# topk_neighbor_mean on {machine} ({device}), commit {commit}, {when}")
    print(f"# k={args.k}; measured matmul rate {rate:.2f} TFLOP/s; methods: {', '.join(impls)}\n")
    csv_rows = []
    for n in ns:
        q = min(n, queries or n)
        for dim in dims:
            x = torch.randn(n, dim, device=device, generator=torch.Generator(device).manual_seed(0))
            flops = 2.0 * q * n * dim
            results = run_size(impls, x, args.k, q, args.repeats, device)
            truth_name = "reference" if "reference" in results else next(
                m for m in results if m not in ("faiss",) and not m.endswith("fast"))
            truth_mean, truth = results[truth_name][1]
            rows = []
            for name, (ms, (mean, idx)) in results.items():
                tflops = flops / (ms * 1e-3) / 1e12
                mean_err = (mean.float().cpu() - truth_mean.float().cpu()).abs().max().item()
                rows.append([name, f"{ms / 1e3:.2f}", f"{tflops:.3f}", f"{100 * tflops / rate:.0f}%",
                             f"{recall(idx, truth):.5f}", rows_differing(idx, truth), f"{mean_err:.1e}",
                             f"{results[truth_name][0] / ms:.2f}x"])
                row = dict(date=when, commit=commit, machine=machine, device=device, n=n, D=dim, k=args.k,
                           method=name, median_ms=f"{ms:.1f}", tflops=f"{tflops:.4f}",
                           matmul_tflops=f"{rate:.3f}", recall=f"{recall(idx, truth):.5f}",
                           rows_differing=rows_differing(idx, truth), recall_truth=truth_name)
                csv_rows.append(row if q == n else {**row, "q": q})
            print(f"## n={n} q={q} D={dim} k={args.k} (recall against {truth_name})")
            print(markdown_table(["method", "median s", "TFLOP/s", "% of matmul", f"recall@{args.k}",
                                  "rows with another set", "max mean error", f"speed-up vs {truth_name}"], rows))
            print()
    if not args.no_csv:
        full = [r for r in csv_rows if "q" not in r]
        subset = [r for r in csv_rows if "q" in r]
        for name, part in (("topk_neighbor_mean", full), ("topk_neighbor_mean_queries", subset)):
            if part:
                print(f"appended {len(part)} rows to {append_csv(name, part)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
